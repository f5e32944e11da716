#!/usr/bin/env bash
# A throwaway PostgreSQL (Debian's packages) for a team's Prefect server, or for the tests.
#   scripts/postgres.sh start DIR [PORT]   initialise DIR, start on 127.0.0.1:PORT (default 5432), create
#                                          database "prefect", print its SQLAlchemy URL for
#                                          PREFECT_API_DATABASE_CONNECTION_URL
#   scripts/postgres.sh stop DIR
# Every connection needs the password (scram-sha-256, no trust): POSTGRES_PASSWORD, or a random one kept in
# DIR/password (mode 600) when DIR is initialised. It listens on loopback only.
# Installs Debian's postgresql first when it is missing and we are root (exit 3 when it cannot).
set -euo pipefail
cmd=${1:?usage: postgres.sh start|stop DIR [PORT]}
dir=$(realpath -m "${2:?usage: postgres.sh start|stop DIR [PORT]}")
port=${3:-5432}

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
bin=$(pg_bin)
if [ -z "$bin" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }
    bin=$(pg_bin)
  fi
  [ -n "$bin" ] || { echo "PostgreSQL is not installed (apt-get install postgresql)" >&2; exit 3; }
fi
# PostgreSQL refuses to run as root: run it as the postgres user then
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    (umask 077; printf '%s' "${POSTGRES_PASSWORD:-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')}" >"$dir/password")
    [ "$(id -u)" = 0 ] && chown postgres "$dir/password"
    as_pg "$bin/initdb" -D "$dir/data" -A scram-sha-256 --pwfile="$dir/password" -U postgres -E UTF8 >"$dir/initdb.log"
  fi
  export PGPASSWORD
  PGPASSWORD=$(cat "$dir/password")
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -o "-p $port -k $dir -h 127.0.0.1 -c max_connections=200" start >&2
  as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'prefect'" | grep -q 1 ||
    as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres prefect
  echo "postgresql+asyncpg://postgres:$PGPASSWORD@127.0.0.1:$port/prefect"
  ;;
stop)
  as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2
  ;;
*)
  echo "unknown command $cmd (start or stop)" >&2
  exit 2
  ;;
esac
