#!/bin/sh
# Initialises the cluster's database on first start (roles and passwords from the
# environment the cluster tool supplies), then runs Postgres in the foreground.
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    umask 077
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile
    initdb --pgdata="$PGDATA" --username=postgres --pwfile=/tmp/pwfile --auth=scram-sha-256 \
        --encoding=UTF8 --locale=C >/dev/null
    rm /tmp/pwfile
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$PGDATA/pg_hba.conf"
    postgres --single -D "$PGDATA" postgres >/dev/null <<SQL
CREATE ROLE $OWNER_ROLE LOGIN PASSWORD '$OWNER_PASSWORD';
CREATE ROLE $SERVICE_ROLE LOGIN PASSWORD '$SERVICE_PASSWORD';
CREATE DATABASE $DATABASE OWNER $OWNER_ROLE;
SQL
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
