#!/bin/sh
# queuekit/postgres entry point (scripts/build-postgres-image): PostgreSQL for the queuekit journal,
# run as the image's non-root user (postgres, uid 999).
#
# First start (no $PGDATA/PG_VERSION): initdb with the superuser $POSTGRES_USER (default queuekit)
# whose password is read from $POSTGRES_PASSWORD_FILE (required; never from an environment
# variable), scram-sha-256 for every connection, a database $POSTGRES_DB (default queuekit) owned
# by that user. Then, every start: postgres listening on all interfaces of the container network
# (port 5432), Unix socket in /tmp (the root filesystem may be read-only).
# PGDATA defaults to a subdirectory of the volume, so a volume whose root belongs to another user
# (a Kubernetes fsGroup volume) still works: initdb needs a directory it owns.
# Extra arguments are passed to postgres (e.g. -c synchronous_commit=on).
set -eu
PGDATA=${PGDATA:-/var/lib/postgresql/data/pgdata}
export PGDATA
user=${POSTGRES_USER:-queuekit}
db=${POSTGRES_DB:-queuekit}
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

if [ "$(id -u)" = 0 ]; then
  echo "queuekit-postgres: refusing to run as root: run as the image's user (postgres, 999)" >&2
  exit 1
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "${POSTGRES_PASSWORD_FILE:-}" ] || [ ! -r "$POSTGRES_PASSWORD_FILE" ] || [ ! -s "$POSTGRES_PASSWORD_FILE" ]; then
    echo "queuekit-postgres: POSTGRES_PASSWORD_FILE must name a readable, non-empty file holding the password" \
         "of $user (first start: the data directory $PGDATA is empty)" >&2
    exit 1
  fi
  mkdir -p "$PGDATA"
  chmod 0700 "$PGDATA"
  echo "queuekit-postgres: initialising $PGDATA (superuser $user, database $db)"
  "$bin/initdb" -D "$PGDATA" -U "$user" --pwfile="$POSTGRES_PASSWORD_FILE" \
    --auth-local=scram-sha-256 --auth-host=scram-sha-256 -E UTF8 --locale=C >/dev/null
  # Clients come from the container network: password (scram-sha-256) from any address.
  printf '%s\n' 'host all all 0.0.0.0/0 scram-sha-256' 'host all all ::/0 scram-sha-256' >> "$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" | "$bin/postgres" --single -D "$PGDATA" -j postgres >/dev/null
  fi
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
