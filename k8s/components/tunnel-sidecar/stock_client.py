# The seed's stock multiprocessing.managers client, unmodified (the process tests run this file as
# STOCK_CLIENT): it speaks plaintext to 127.0.0.1:<port> and knows nothing of TLS or of
# queuekit. The tunnel examples run it beside `queuekit tunnel`, whose 127.0.0.1:50000 carries each
# connection over TLS to the server: this component's Job (a native sidecar in the pod) and
# compose/compose.tunnel.yaml (network_mode: service:tunnel), which mounts this same file.
#
#   python3 stock_client.py <port> <authkey file> put <n>   puts {'i': 0..n-1} and 'last' on "tasks"
#   python3 stock_client.py <port> <authkey file> get       takes everything there is (a consumer key)
import queue, sys
from multiprocessing.managers import BaseManager
class QueueManager(BaseManager):
    pass
QueueManager.register('get_task_queue')
m = QueueManager(address=('127.0.0.1', int(sys.argv[1])), authkey=open(sys.argv[2], 'rb').read().strip())
m.connect()
q = m.get_task_queue()
if sys.argv[3] == 'put':
    for i in range(int(sys.argv[4])):
        q.put({'i': i})
    q.put_nowait('last')
    print('put', q.qsize())
else:
    got = []
    while True:
        try:
            got.append(q.get(timeout=1))
        except queue.Empty:
            break
    try:
        q.get_nowait()
    except queue.Empty:
        print('empty', q.empty())
    print('got', len(got), got[0], got[-1])
