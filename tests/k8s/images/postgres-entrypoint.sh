#!/bin/sh
# PostgreSQL of the test image: initialises $PGDATA on first start (with its
# WAL in $PGWAL when set, the layout of the group snapshot scenario), then
# runs the server in the foreground as the postgres user, listening on the
# pod's addresses. A data directory that holds a cluster is never
# initialised again.
set -eu
: "${PGDATA:=/var/lib/postgresql/data/pgdata}"
bin=/usr/lib/postgresql/15/bin
mkdir -p "$PGDATA"
chown postgres:postgres "$PGDATA"
chmod 0700 "$PGDATA"
if [ -n "${PGWAL:-}" ]; then
    mkdir -p "$PGWAL"
    chown postgres:postgres "$PGWAL"
fi
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -n "${PGWAL:-}" ]; then
        runuser -u postgres -- "$bin/initdb" -D "$PGDATA" --waldir="$PGWAL" --auth=trust --username=postgres
    else
        runuser -u postgres -- "$bin/initdb" -D "$PGDATA" --auth=trust --username=postgres
    fi
    echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
# A pid file left by a killed pod, or carried by a snapshot, names a process
# of another PID namespace; the volume is ReadWriteOnce, so no other server
# uses this directory.
rm -f "$PGDATA/postmaster.pid"
exec runuser -u postgres -- "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
