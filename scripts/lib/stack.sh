# shellcheck shell=bash
# A private local stack for the scripts that run a daemon (bench-api, api-fuzz, soak): a moto
# server of its own on a free port, a PostgreSQL database of its own, a config derived from
# config/local.toml with free API and admin ports, the demo data with the Cognito subs mapped,
# and the daemon. Nothing is shared with scripts/demo (ports 5055/7077/9177) or with another
# run; everything it started stops, and the database is dropped, when the script exits.
#
#   source "$root/scripts/lib/stack.sh"
#   stack_up BIN [NAME]        BIN: the cruddur-syncd binary; NAME tags the database
#   stack_daemon               starts `run` (log: $stack_work/daemon.log), waits for /readyz
#   stack_track PID            one more process to stop on exit
# After stack_up: stack_bin, stack_work (a temp dir), stack_cfg (also CRUDDUR_SYNCD_CONFIG),
# stack_db, stack_moto (URL), stack_api and stack_admin (host:port). After stack_daemon:
# stack_daemon_pid.

stack_pids=()
stack_db=""
stack_work=""

stack_cleanup() {
    local p
    for p in "${stack_pids[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${stack_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    if [[ -n "$stack_db" ]]; then
        psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS $stack_db WITH (FORCE)" >/dev/null 2>&1 || true
    fi
    [[ -z "$stack_work" ]] || rm -rf "$stack_work"
}
trap stack_cleanup EXIT

stack_track() {
    stack_pids+=("$1")
}

stack_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

stack_wait_http() { # URL SECONDS
    local deadline=$((SECONDS + $2))
    until curl -fs -o /dev/null --max-time 2 "$1"; do
        if ((SECONDS >= deadline)); then
            echo "stack: no answer from $1 within $2 s" >&2
            return 1
        fi
        sleep 0.1
    done
}

stack_up() { # BIN [NAME]
    stack_bin="$1"
    local name="${2:-stack}"
    "$root/scripts/venv" >/dev/null
    "$root/scripts/ensure-postgres" >/dev/null
    stack_work="$(mktemp -d)"
    stack_db="cruddur_${name}_$$"

    local moto_port api_port admin_port
    moto_port="$(stack_free_port)"
    MOTO_COGNITO_IDP_USER_POOL_ID_STRATEGY=HASH MOTO_COGNITO_IDP_USER_POOL_CLIENT_ID_STRATEGY=HASH \
        "$root/.venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$stack_work/moto.log" 2>&1 &
    stack_track $!
    stack_moto="http://127.0.0.1:$moto_port"
    stack_wait_http "$stack_moto/moto-api/" 20

    api_port="$(stack_free_port)"
    admin_port="$(stack_free_port)"
    stack_api="127.0.0.1:$api_port"
    stack_admin="127.0.0.1:$admin_port"
    stack_cfg="$stack_work/config.toml"
    # The reconciliation schedule is off: stack_up maps the subs once, below, and a run in the
    # middle of a measurement would only add noise.
    sed -e "s/127.0.0.1:5055/127.0.0.1:$moto_port/g" \
        -e "s#/cruddur\"#/$stack_db\"#" \
        -e "s/127.0.0.1:7077/$stack_api/" \
        -e "s/127.0.0.1:9177/$stack_admin/" \
        -e 's/^level = .*/level = "warn"/' \
        -e 's/^enabled = true/enabled = false/' \
        "$root/config/local.toml" >"$stack_cfg"
    export CRUDDUR_SYNCD_CONFIG="$stack_cfg"

    "$stack_bin" ddb schema-load >/dev/null
    "$stack_bin" db schema-load >/dev/null
    "$stack_bin" db seed >/dev/null
    "$stack_bin" ddb seed >/dev/null
    "$stack_bin" cognito seed >/dev/null
    "$stack_bin" reconcile >/dev/null # maps the demo users' Cognito subs onto their rows
}

stack_daemon() {
    "$stack_bin" run 2>"$stack_work/daemon.log" &
    stack_daemon_pid=$!
    stack_track "$stack_daemon_pid"
    if ! stack_wait_http "http://$stack_admin/readyz" 60; then
        echo "stack: the daemon did not get ready; the end of its log:" >&2
        tail -n 20 "$stack_work/daemon.log" >&2
        return 1
    fi
}
