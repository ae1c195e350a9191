#!/usr/bin/env bash
# A throwaway Nomad dev agent (server + client in one process, in-memory
# state) for end-to-end tests, with nomad/agent-dev.hcl (raw_exec on; docker
# with host volumes, no privileged containers, no image GC).
#
# usage: tests/e2e/nomad/nomad-dev.sh start|stop|restart|status DIR
#
#   start   builds or finds Nomad 1.6.3 (tests/e2e/nomad/build-nomad.sh),
#           starts `nomad agent -dev` as root on 127.0.0.1 in the background
#           and waits until /v1/status/leader is non-empty and /v1/nodes
#           shows the node ready with the drivers healthy. Last stdout line:
#           NOMAD_ADDR=http://127.0.0.1:PORT (also in DIR/env).
#   stop    purges every job, waits for the allocations to stop, stops the
#           agent (SIGINT: a dev client destroys its allocations on the way
#           out; SIGKILL after the timeout), then removes whatever is left:
#           containers and processes of its allocations, tmpfs mounts, and
#           DIR/data. Keeps DIR/nomad.log.
#   restart stops the agent process alone (SIGTERM: its allocations keep
#           running), starts it again with the same configuration and waits
#           until it is ready; only with NOMAD_DEV_PERSIST=1 (a -dev agent
#           keeps its state in memory and forgets every job).
#   status  prints the agent's state; exit 0 ready, 1 running but not
#           ready, 3 not running.
#
# DIR holds nomad.pid, nomad.log, env (NOMAD_ADDR, and NOMAD_CACERT and
# NOMAD_TOKEN when TLS or ACLs are on), extra.hcl, tls/ and data/ (the agent's
# data_dir; allocation directories are under data/alloc). DIR and data/ are
# made searchable by other users (go+x): slot-agent under raw_exec runs each
# slot as its own uid only when its data dir's ancestors are searchable.
#
# On failure: a message naming the reason, and the tail of DIR/nomad.log.
#
# env: NOMAD_BIN                  nomad binary (default: build-nomad.sh's)
#      NOMAD_DEV_HTTP_PORT        HTTP port (default 4646); RPC and serf use
#                                 the next two ports
#      NOMAD_DEV_DRIVERS          drivers that must be healthy
#                                 (default "docker raw_exec")
#      NOMAD_DEV_TIMEOUT          start timeout in seconds (default 90)
#      NOMAD_DEV_STOP_TIMEOUT     stop timeout in seconds (default 60)
#      NOMAD_DEV_KEEP_DATA=1      stop keeps DIR/data
#      NOMAD_DEV_PERSIST=1        not -dev: one server (bootstrap_expect 1)
#                                 and client with state in DIR/data, so a
#                                 restart keeps jobs and running allocations
#      NOMAD_DEV_ACL=1            ACLs on; start bootstraps them and writes
#                                 the management token to DIR/env
#      NOMAD_DEV_TLS=1            HTTPS with a throwaway CA (DIR/tls/ca.pem);
#                                 the server's certificate names localhost
#                                 and server.global.nomad, not 127.0.0.1, so
#                                 https://127.0.0.1 needs a TLS server name
set -euo pipefail

me="nomad-dev.sh"
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
PY=/usr/bin/python3

die() {
    echo "$me: error: $*" >&2
    exit 1
}
log() { echo "$me: $*" >&2; }
# The words of $1 on one line.
words() { tr -s " \n" "  " <<<"$1" | sed "s/ $//"; }
usage() {
    echo "usage: $me start|stop|status DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
[ -n "$2" ] || usage
if [ "$cmd" = start ]; then
    mkdir -p "$2" 2>/dev/null || die "cannot create $2"
elif ! [ -d "$2" ]; then
    case $cmd in
    status)
        echo "not running ($2 does not exist)"
        exit 3
        ;;
    restart) die "nothing to restart: $2 does not exist" ;;
    stop)
        log "nothing to stop: $2 does not exist"
        exit 0
        ;;
    *) usage ;;
    esac
fi
DIR=$(cd "$2" && pwd)
DATA=$DIR/data
PIDFILE=$DIR/nomad.pid
LOGFILE=$DIR/nomad.log
ENVFILE=$DIR/env

HTTP_PORT=${NOMAD_DEV_HTTP_PORT:-4646}
DRIVERS=${NOMAD_DEV_DRIVERS:-docker raw_exec}
START_TIMEOUT=${NOMAD_DEV_TIMEOUT:-90}
PERSIST=${NOMAD_DEV_PERSIST:-0}
ACL=${NOMAD_DEV_ACL:-0}
TLS=${NOMAD_DEV_TLS:-0}
STOP_TIMEOUT=${NOMAD_DEV_STOP_TIMEOUT:-60}
if ! [[ $HTTP_PORT =~ ^[0-9]+$ ]] || [ "$HTTP_PORT" -lt 1 ] || [ "$HTTP_PORT" -gt 65533 ]; then
    die "NOMAD_DEV_HTTP_PORT must be a port number below 65534, got '$HTTP_PORT'"
fi
[ -x "$PY" ] || die "$PY is missing (apt-get install python3)"
command -v curl >/dev/null || die "curl is missing (apt-get install curl)"

log_tail() {
    if [ -s "$LOGFILE" ]; then
        echo "---- last lines of $LOGFILE ----" >&2
        tail -n "${1:-40}" "$LOGFILE" >&2
        echo "----" >&2
    fi
}

# The pid of the running agent started here, or nothing.
agent_pid() {
    local pid exe
    [ -f "$PIDFILE" ] || return 0
    pid=$(cat "$PIDFILE" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    # Still a nomad agent with our data dir (not a recycled pid).
    case $exe in */nomad) ;; *) return 0 ;; esac
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-data-dir $DATA " || return 0
    echo "$pid"
}

addr() {
    if [ -f "$ENVFILE" ]; then
        sed -n 's/^NOMAD_ADDR=//p' "$ENVFILE"
    elif [ "$TLS" = 1 ]; then
        echo "https://localhost:$HTTP_PORT"
    else
        echo "http://127.0.0.1:$HTTP_PORT"
    fi
}

# curl with the CA and the token this agent needs; $1 a /v1 path, then
# curl's own options.
ncurl() {
    local path=$1 ca tok
    shift
    local opts=(-sS --fail --max-time 10)
    ca=$(sed -n 's/^NOMAD_CACERT=//p' "$ENVFILE" 2>/dev/null || true)
    tok=$(sed -n 's/^NOMAD_TOKEN=//p' "$ENVFILE" 2>/dev/null || true)
    [ -z "$ca" ] || opts+=(--cacert "$ca")
    [ -z "$tok" ] || opts+=(-H "X-Nomad-Token: $tok")
    curl "${opts[@]}" "$@" "$(addr)$path"
}

# GET $1 (a /v1 path) from the agent; prints the body.
api() { ncurl "$1" --max-time 5; }

# Prints one line describing the node and its drivers, and exits 0 when
# the node is ready with every driver of $DRIVERS healthy. stdin: /v1/nodes.
node_check() {
    "$PY" -c '
import json, sys
want = sys.argv[1].split()
try:
    nodes = json.load(sys.stdin)
except ValueError as e:
    print("bad /v1/nodes answer: %s" % e); sys.exit(1)
if not nodes:
    print("no node registered yet"); sys.exit(1)
n = nodes[0]
drv = n.get("Drivers") or {}
parts, ok = [], n.get("Status") == "ready"
for d in want:
    i = drv.get(d)
    if not i:
        parts.append("%s: not fingerprinted" % d); ok = False
    elif not (i.get("Detected") and i.get("Healthy")):
        parts.append("%s: unhealthy (%s)" % (d, i.get("HealthDescription") or "not detected")); ok = False
    else:
        parts.append("%s: healthy" % d)
print("node %s %s; %s" % (n.get("Name"), n.get("Status"), ", ".join(parts)))
sys.exit(0 if ok else 1)
' "$DRIVERS"
}

port_in_use() { [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]; }

# --- cleanup of what the agent left behind ---------------------------------

# Containers of allocations under $DATA (Nomad bind-mounts the allocation's
# alloc/, local/ and secrets/ into every container it starts).
leftover_containers() {
    command -v docker >/dev/null || return 0
    docker info >/dev/null 2>&1 || return 0
    local id
    for id in $(docker ps -aq --filter label=com.hashicorp.nomad.alloc_id 2>/dev/null); do
        if docker inspect -f '{{range .Mounts}}{{.Source}}{{"\n"}}{{end}}' "$id" 2>/dev/null |
            grep -qF "$DATA/"; then
            echo "$id"
        fi
    done
}

# Processes that belong to the agent: nomad plugin processes in its session
# (it is started with setsid, so the session id is its pid; logmon and
# docker_logger), or with the data dir in their command line or working
# directory (executors, raw_exec tasks, apptainer).
leftover_pids() {
    local sid=${1:-} p st cwd args
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        { [ "$p" = $$ ] || [ "$p" = "$BASHPID" ]; } && continue
        # Fields after "(comm) ": state ppid pgrp session ...
        st=$(cat "/proc/$p/stat" 2>/dev/null) || continue
        st=${st##*) }
        read -r _ _ _ st _ <<<"$st"
        if [ -n "$sid" ] && [ "$st" = "$sid" ]; then
            case $(readlink "/proc/$p/exe" 2>/dev/null) in */nomad)
                echo "$p"
                continue
                ;;
            esac
        fi
        cwd=$(readlink "/proc/$p/cwd" 2>/dev/null) || continue
        case $cwd/ in "$DATA"/*)
            echo "$p"
            continue
            ;;
        esac
        args=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null) || continue
        case $args in *"$DATA/"*) echo "$p" ;; esac
    done
}

leftover_mounts() {
    awk -v d="$DATA/" 'index($2 "/", d) == 1 { print $2 }' /proc/self/mounts | sort -r
}

# Removes everything left; prints what it did. Fails when something stays.
cleanup_leftovers() {
    local sid=${1:-} ids pids m n=0
    ids=$(leftover_containers)
    if [ -n "$ids" ]; then
        log "removing containers left behind: $(words "$ids")"
        # shellcheck disable=SC2086
        docker rm -f $ids >/dev/null 2>&1 || true
    fi
    pids=$(leftover_pids "$sid")
    if [ -n "$pids" ]; then
        log "stopping processes left behind: $(words "$pids")"
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        while [ $n -lt 10 ] && [ -n "$(leftover_pids "$sid")" ]; do
            sleep 1
            n=$((n + 1))
        done
        pids=$(leftover_pids "$sid")
        if [ -n "$pids" ]; then
            log "killing processes left behind: $(words "$pids")"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
            sleep 1
        fi
    fi
    for m in $(leftover_mounts); do
        umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
    done
    local bad=""
    ids=$(leftover_containers)
    [ -z "$ids" ] || bad="$bad containers: $(words "$ids");"
    pids=$(leftover_pids "$sid")
    [ -z "$pids" ] || bad="$bad processes: $(words "$pids");"
    m=$(leftover_mounts)
    [ -z "$m" ] || bad="$bad mounts: $(words "$m");"
    [ -z "$bad" ] || die "could not clean up after the agent in $DIR:$bad"
}

# --- stop --------------------------------------------------------------------

do_stop() {
    local pid t0=$SECONDS jobs left
    pid=$(agent_pid)
    if [ -n "$pid" ]; then
        # Purge every job so nothing is rescheduled, then wait for the
        # allocations to reach a terminal client status.
        jobs=$(api /v1/jobs 2>/dev/null | "$PY" -c '
import json, sys
for j in json.load(sys.stdin): print(j["ID"])' 2>/dev/null || true)
        for j in $jobs; do
            ncurl "/v1/job/$j?purge=true" -X DELETE >/dev/null 2>&1 ||
                log "warning: could not purge job $j"
        done
        [ -z "$jobs" ] || log "purged jobs: $(words "$jobs")"
        while :; do
            left=$(api /v1/allocations 2>/dev/null | "$PY" -c '
import json, sys
print(" ".join(a["ID"][:8] for a in json.load(sys.stdin) if a["ClientStatus"] in ("pending", "running")))' 2>/dev/null) || left="?"
            [ -n "$left" ] || break
            if [ $((SECONDS - t0)) -ge $((STOP_TIMEOUT / 2)) ]; then
                log "warning: allocations still running after $((SECONDS - t0)) s: $left (stopping the agent anyway)"
                break
            fi
            sleep 1
        done
        kill -INT "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$STOP_TIMEOUT" ]; do
            sleep 1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "warning: the agent (pid $pid) did not exit within ${STOP_TIMEOUT} s of the stop; killing it"
            log_tail 20
            kill -KILL "$pid" 2>/dev/null || true
            sleep 1
        fi
        log "agent (pid $pid) stopped after $((SECONDS - t0)) s"
    else
        log "no agent running for $DIR"
        # A killed agent's session id, for its plugin processes.
        pid=$(cat "$PIDFILE" 2>/dev/null || true)
        [[ $pid =~ ^[0-9]+$ ]] || pid=""
    fi
    cleanup_leftovers "$pid"
    rm -f "$PIDFILE"
    if [ "${NOMAD_DEV_KEEP_DATA:-0}" != 1 ] && [ -d "$DATA" ]; then
        rm -rf "$DATA" || die "could not remove $DATA"
    fi
}

# --- start -------------------------------------------------------------------

# A throwaway CA and a server certificate for localhost and
# server.global.nomad (deliberately not for 127.0.0.1).
make_tls() {
    local t=$DIR/tls
    command -v openssl >/dev/null || die "openssl is missing (apt-get install openssl)"
    rm -rf "$t"
    mkdir -p "$t"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=slot test CA" -keyout "$t/ca-key.pem" -out "$t/ca.pem" >/dev/null 2>&1 ||
        die "openssl could not make the test CA"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=server.global.nomad" -keyout "$t/server-key.pem" -out "$t/server.csr" \
        >/dev/null 2>&1 || die "openssl could not make the server key"
    printf 'subjectAltName=DNS:server.global.nomad,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n' >"$t/ext"
    openssl x509 -req -in "$t/server.csr" -CA "$t/ca.pem" -CAkey "$t/ca-key.pem" \
        -CAcreateserial -days 2 -extfile "$t/ext" -out "$t/server.pem" >/dev/null 2>&1 ||
        die "openssl could not sign the server certificate"
}

write_config() {
    {
        echo "# written by $me"
        echo 'bind_addr = "127.0.0.1"'
        echo "ports {"
        echo "  http = $HTTP_PORT"
        echo "  rpc  = $((HTTP_PORT + 1))"
        echo "  serf = $((HTTP_PORT + 2))"
        echo "}"
        if [ "$PERSIST" = 1 ]; then
            # What -dev would give, minus the in-memory state.
            echo 'advertise {'
            echo '  http = "127.0.0.1"'
            echo '  rpc  = "127.0.0.1"'
            echo '  serf = "127.0.0.1"'
            echo '}'
            echo 'server {'
            echo '  enabled          = true'
            echo '  bootstrap_expect = 1'
            echo '}'
            echo 'client {'
            echo '  enabled           = true'
            echo '  network_interface = "lo"'
            echo '}'
        fi
        [ "$ACL" != 1 ] || printf 'acl {\n  enabled = true\n}\n'
        if [ "$TLS" = 1 ]; then
            echo 'tls {'
            echo '  http                = true'
            echo '  rpc                 = false'
            echo "  ca_file             = \"$DIR/tls/ca.pem\""
            echo "  cert_file           = \"$DIR/tls/server.pem\""
            echo "  key_file            = \"$DIR/tls/server-key.pem\""
            echo '  verify_https_client = false'
            echo '}'
        fi
    } >"$DIR/extra.hcl"
    {
        if [ "$TLS" = 1 ]; then
            echo "NOMAD_ADDR=https://localhost:$HTTP_PORT"
            echo "NOMAD_CACERT=$DIR/tls/ca.pem"
        else
            echo "NOMAD_ADDR=http://127.0.0.1:$HTTP_PORT"
        fi
    } >"$ENVFILE"
}

# Starts the agent on the configuration in DIR and waits until it is ready.
launch() {
    local nomad=$1 pid t0 leader nodes state="" boot tok mode=(agent -dev)
    [ "$PERSIST" != 1 ] || mode=(agent)
    log "starting $nomad ${mode[*]} (log: $LOGFILE)"
    # setsid: its own session, so a terminal's Ctrl-C does not reach it and
    # stop can find the processes it leaves. setsid execs in place here
    # (a background child is no process group leader), so $! is nomad.
    setsid "$nomad" "${mode[@]}" \
        -config "$repo/nomad/agent-dev.hcl" -config "$DIR/extra.hcl" \
        -data-dir "$DATA" </dev/null >>"$LOGFILE" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"

    t0=$SECONDS
    while :; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null && rc=0 || rc=$?
            log_tail
            rm -f "$PIDFILE"
            die "the nomad agent exited during startup (status $rc)"
        fi
        leader=$(api /v1/status/leader 2>/dev/null || true)
        if [ -n "$leader" ] && [ "$leader" != '""' ]; then
            if [ "$ACL" = 1 ] && ! grep -q '^NOMAD_TOKEN=' "$ENVFILE"; then
                # Once per data dir; a restarted agent keeps its ACL state.
                if boot=$(ncurl /v1/acl/bootstrap -X POST 2>&1); then
                    tok=$("$PY" -c 'import json,sys; print(json.load(sys.stdin)["SecretID"])' <<<"$boot") ||
                        die "bad answer to the ACL bootstrap: $boot"
                    echo "NOMAD_TOKEN=$tok" >>"$ENVFILE"
                else
                    state="ACL bootstrap failed: $boot"
                fi
            fi
            if nodes=$(api /v1/nodes 2>/dev/null); then
                if state=$(node_check <<<"$nodes"); then
                    break
                fi
            else
                state="leader $leader; GET /v1/nodes failed"
            fi
        else
            state="no leader yet"
        fi
        if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
            log_tail
            log "stopping the agent that did not become ready"
            do_stop >/dev/null 2>&1 || true
            die "the nomad agent was not ready within ${START_TIMEOUT} s: $state"
        fi
        sleep 1
    done
    log "ready in $((SECONDS - t0)) s: leader $leader; $state"
}

nomad_bin() {
    local nomad
    if [ -n "${NOMAD_BIN:-}" ]; then
        nomad=$NOMAD_BIN
    else
        nomad=$("$here/build-nomad.sh" | tail -n 1) || die "tests/e2e/nomad/build-nomad.sh failed"
    fi
    [ -x "$nomad" ] || die "no nomad binary at '$nomad'"
    echo "$nomad"
}

do_start() {
    local pid nomad rpc serf
    [ "$(id -u)" = 0 ] ||
        die "run as root: the Nomad 1.6 docker driver reports 'Driver must run as root' otherwise (cgroup v2), and the test jobs run agents as root"
    pid=$(agent_pid)
    [ -z "$pid" ] || die "an agent for $DIR is already running (pid $pid, NOMAD_ADDR=$(addr)); run '$me stop $DIR' first"
    rm -f "$PIDFILE"

    rpc=$((HTTP_PORT + 1))
    serf=$((HTTP_PORT + 2))
    local p
    for p in "$HTTP_PORT" "$rpc" "$serf"; do
        ! port_in_use "$p" || die "port $p is already in use (the agent needs ports $HTTP_PORT-$serf; set NOMAD_DEV_HTTP_PORT to another first port)"
    done
    case " $DRIVERS " in *" docker "*)
        command -v docker >/dev/null || die "the docker CLI is missing, and NOMAD_DEV_DRIVERS includes docker"
        docker info >/dev/null 2>&1 ||
            die "the Docker engine does not answer 'docker info' (start it first: Nomad re-fingerprints docker only every 30 s)"
        ;;
    esac
    nomad=$(nomad_bin) || exit 1

    # A leftover data dir (an agent that was killed) may hold mounts.
    if [ -d "$DATA" ]; then
        cleanup_leftovers ""
        rm -rf "$DATA"
    fi
    mkdir -p "$DATA"
    chmod go+x "$DIR"
    chmod 0711 "$DATA"
    [ "$TLS" != 1 ] || make_tls
    write_config
    : >"$LOGFILE"
    launch "$nomad"
    echo "NOMAD_ADDR=$(addr)"
}

do_restart() {
    local pid nomad t0=$SECONDS
    [ "$PERSIST" = 1 ] || die "restart needs NOMAD_DEV_PERSIST=1 (a -dev agent forgets its jobs)"
    pid=$(agent_pid)
    [ -n "$pid" ] || die "no agent running for $DIR"
    nomad=$(nomad_bin) || exit 1
    # SIGTERM without leave_on_terminate: the client goes away and leaves
    # its tasks running; the restarted client reattaches to them.
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$STOP_TIMEOUT" ]; do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        # Seen once: a client hanging in its shutdown. A crash is a restart
        # too: the state is on disk and the tasks keep running either way.
        log "warning: the agent (pid $pid) did not exit within ${STOP_TIMEOUT} s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        while kill -0 "$pid" 2>/dev/null; do sleep 0.2; done
    fi
    log "agent (pid $pid) stopped after $((SECONDS - t0)) s; starting it again"
    launch "$nomad"
    echo "NOMAD_ADDR=$(addr)"
}

# --- status ------------------------------------------------------------------

do_status() {
    local pid leader nodes state jobs
    pid=$(agent_pid)
    if [ -z "$pid" ]; then
        echo "not running ($DIR)"
        return 3
    fi
    echo "running: pid $pid, NOMAD_ADDR=$(addr), log $LOGFILE"
    leader=$(api /v1/status/leader 2>/dev/null) || {
        echo "the HTTP API does not answer"
        return 1
    }
    echo "leader: $leader"
    nodes=$(api /v1/nodes 2>/dev/null) || nodes="[]"
    local rc=0
    state=$(node_check <<<"$nodes") || rc=1
    echo "$state"
    jobs=$(api /v1/jobs 2>/dev/null | "$PY" -c '
import json, sys
for j in json.load(sys.stdin): print("job %s: %s" % (j["ID"], j["Status"]))' 2>/dev/null || true)
    [ -z "$jobs" ] || echo "$jobs"
    [ "$leader" != '""' ] || rc=1
    return $rc
}

case $cmd in
start) do_start ;;
stop) do_stop ;;
restart) do_restart ;;
status)
    rc=0
    do_status || rc=$?
    exit $rc
    ;;
*) usage ;;
esac
