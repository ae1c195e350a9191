#!/usr/bin/env bash
# A throwaway one-node Slurm cluster (Debian 12: Slurm 22.05, munge 0.5.15)
# for end-to-end tests: its own munged, slurmctld and slurmd, run as root,
# reached on 127.0.0.1, with every file under DIR.
#
# usage: tests/e2e/slurm/slurm-dev.sh start|stop|status|restart-ctld DIR
#
#   start   installs what is missing of slurmctld slurmd slurm-client munge
#           (apt-get), makes a munge key, writes DIR/slurm.conf, starts munged,
#           slurmctld and slurmd in the background and waits until sinfo
#           shows the node idle and `srun -N1 true` works. Last stdout line:
#           SLURM_CONF=DIR/slurm.conf (also in DIR/env); clients need it:
#           SLURM_CONF=DIR/slurm.conf srun ...
#   stop    cancels every job and waits for them to end, stops slurmd,
#           slurmctld and munged (SIGTERM, SIGKILL after the timeout), kills
#           whatever the jobs left (slurmstepd and its tasks), and removes
#           the state: DIR/state, DIR/spool, DIR/munge, the pid files and
#           DIR/env. Keeps the logs and slurm.conf. Safe to repeat, and after
#           a start that failed halfway.
#   status  prints the state; exit 0 ready, 1 running but not ready, 3 not
#           running.
#   restart-ctld
#           stops slurmctld alone (SIGTERM: it saves its state; running jobs
#           keep running under slurmd) if it runs, starts it again on the same
#           configuration and state, and waits until `scontrol ping` answers
#           and slurmd has registered again (until then new steps in running
#           jobs wait with "Requested nodes are busy"). To test a crash, kill
#           -9 the pid in DIR/slurmctld.pid first.
#
# The cluster: ClusterName slotdev, node $(hostname -s) (NodeAddr 127.0.0.1)
# with this machine's CPUs and 95% of its memory, one partition "debug"
# (default, no time limit). select/cons_tres with CR_Core_Memory: memory is a
# scheduled resource (a job asking for more than the node has is refused at
# submission: "Requested node configuration is not available"), but nothing
# enforces it at run time (proctrack/linuxproc, task/none: no cgroups).
# Jobs without --mem get DefMemPerCPU. No accounting (sacct does not work);
# finished jobs stay visible in squeue -t all / scontrol show job for
# MinJobAge seconds. The daemons listen on all addresses (Slurm has no bind
# option); clients reach them on 127.0.0.1.
#
# DIR holds slurm.conf, env, the pid files this script writes
# (slurmctld.pid, slurmd.pid, munged.pid; the daemons' own go to state/ and
# spool/: a daemon truncates its pid file before it writes it, and a check
# reading ours then would take a starting daemon for a dead one), the logs
# (slurmctld.log, slurmd.log; slurmctld.stderr and slurmd.stderr also hold
# errors from before the log files open; munged.log),
# state/ (StateSaveLocation), spool/ (SlurmdSpoolDir) and munge/ (key,
# socket, seed; owned by the munge user). munged runs as the munge user and
# refuses a socket whose directory it cannot reach, so DIR is made go+x and
# every directory above DIR must be searchable by others (o+x; pytest's
# /tmp/pytest-of-USER is 0700: pick another place).
#
# start refuses a DIR with state/, spool/, munge/ or slurm.conf it did not
# write, and stop removes nothing from such a DIR.
#
# On failure: a message naming the reason, and the tail of the logs.
#
# env: SLURM_DEV_PORT             SlurmctldPort (default 6817); SlurmdPort is
#                                 the next port
#      SLURM_DEV_TIMEOUT          start and restart-ctld timeout in seconds
#                                 (default 60)
#      SLURM_DEV_STOP_TIMEOUT     stop timeout in seconds (default 60)
#      SLURM_DEV_CPUS             CPUs of the node (default: this machine's;
#                                 more than that is allowed: slurmd is told
#                                 to trust the configuration)
#      SLURM_DEV_MEM_MB           RealMemory of the node in MB (default 95%
#                                 of this machine's)
#      SLURM_DEV_DEF_MEM_MB       DefMemPerCPU (default 256): what a job
#                                 without --mem is given. Without it a job
#                                 would get the whole node's memory and jobs
#                                 would run one at a time.
#      SLURM_DEV_NODE_TIMEOUT     SlurmdTimeout: seconds without an answer
#                                 from slurmd before the node is DOWN and
#                                 its jobs NODE_FAIL (batch jobs without
#                                 --no-requeue are requeued) (default 30)
#      SLURM_DEV_MIN_JOB_AGE      MinJobAge (default 60)
#      SLURM_DEV_DEBUG            SlurmctldDebug and SlurmdDebug (default info)
set -euo pipefail

me="slurm-dev.sh"
PACKAGES="slurmctld slurmd slurm-client munge"

die() {
    echo "$me: error: $*" >&2
    exit 1
}
log() { echo "$me: $*" >&2; }
# The words of $1 on one line.
words() { tr -s " \n" "  " <<<"$1" | sed "s/ $//"; }
usage() {
    echo "usage: $me start|stop|status|restart-ctld DIR" >&2
    exit 2
}

[ $# -eq 2 ] || usage
cmd=$1
[ -n "$2" ] || usage
case $cmd in start | stop | status | restart-ctld) ;; *) usage ;; esac
if [ "$cmd" = start ]; then
    mkdir -p "$2" 2>/dev/null || die "cannot create $2"
elif ! [ -d "$2" ]; then
    case $cmd in
    status)
        echo "not running ($2 does not exist)"
        exit 3
        ;;
    restart-ctld) die "nothing to restart: $2 does not exist" ;;
    stop)
        log "nothing to stop: $2 does not exist"
        exit 0
        ;;
    esac
fi
DIR=$(cd "$2" && pwd)
# slurm.conf has no quoting: a path with blanks or '#' cannot be written.
case $DIR in *[[:space:]#=\(\)]*) die "DIR must not contain blanks, '#', '=' or parentheses: '$DIR'" ;; esac
CONF=$DIR/slurm.conf
ENVFILE=$DIR/env
STATE=$DIR/state
SPOOL=$DIR/spool
MUNGE_DIR=$DIR/munge
SOCK=$MUNGE_DIR/munge.socket
# Put into the daemons' environment (and so slurmstepd's): how stop finds
# what they leave behind.
MARK="SLOT_SLURM_DEV=$DIR"

PORT=${SLURM_DEV_PORT:-6817}
START_TIMEOUT=${SLURM_DEV_TIMEOUT:-60}
STOP_TIMEOUT=${SLURM_DEV_STOP_TIMEOUT:-60}
DEF_MEM=${SLURM_DEV_DEF_MEM_MB:-256}
NODE_TIMEOUT=${SLURM_DEV_NODE_TIMEOUT:-30}
MIN_JOB_AGE=${SLURM_DEV_MIN_JOB_AGE:-60}
DEBUG=${SLURM_DEV_DEBUG:-info}
if ! [[ $PORT =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65534 ]; then
    die "SLURM_DEV_PORT must be a port number below 65535, got '$PORT'"
fi
SLURMD_PORT=$((PORT + 1))
for v in TIMEOUT STOP_TIMEOUT DEF_MEM_MB NODE_TIMEOUT MIN_JOB_AGE; do
    n=SLURM_DEV_$v
    [[ ${!n:-0} =~ ^[0-9]+$ ]] || die "$n must be a number, got '${!n}'"
done

# Every client command below talks to this cluster, whatever the caller has.
export SLURM_CONF=$CONF
unset SLURM_JOB_ID SLURM_JOBID

log_tail() {
    local f
    for f in "$@"; do
        if [ -s "$f" ]; then
            echo "---- last lines of $f ----" >&2
            tail -n 30 "$f" >&2
            echo "----" >&2
        fi
    done
}
# The *.log files say why a daemon quit once it has opened them (a fatal
# after start-up never reaches its stderr).
all_logs() {
    log_tail "$DIR/munged.log" "$DIR/slurmctld.stderr" "$DIR/slurmctld.log" \
        "$DIR/slurmd.stderr" "$DIR/slurmd.log"
}

# Seconds since $1 (an $EPOCHREALTIME), with one decimal.
since() {
    local us=$((${EPOCHREALTIME/./} - ${1/./}))
    printf '%d.%d' $((us / 1000000)) $((us % 1000000 / 100000))
}

# Alive, not a zombie (stopped daemons are reparented to init, which may
# reap them late; kill -0 succeeds on a zombie).
alive() {
    local st
    { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
    st=${st##*) }
    [ "${st%% *}" != Z ]
}

# The pid of daemon $1 (munged, slurmctld, slurmd) running for DIR, or
# nothing.
daemon_pid() {
    local name=$1 pid exe args
    pid=$(cat "$DIR/$name.pid" 2>/dev/null) || return 0
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    alive "$pid" || return 0
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 0
    # Debian's /usr/sbin/slurmctld is an alternative for slurmctld-wlm.
    case ${exe##*/} in "$name" | "$name"-wlm* | "$name"\ *) ;; *) return 0 ;; esac
    args=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 0
    case $args in *" $CONF "* | *"--socket=$SOCK "*) ;; *) return 0 ;; esac
    echo "$pid"
}

port_in_use() {
    if command -v ss >/dev/null; then
        [ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]
    else
        (: <"/dev/tcp/127.0.0.1/$1") 2>/dev/null
    fi
}

# DIR/slurm.conf is one this script wrote (so state/, spool/ and munge/
# are ours to remove).
ours() { head -n 1 "$CONF" 2>/dev/null | grep -q "^# Written by $me"; }

ctld_up() { scontrol ping 2>/dev/null | grep -q " is UP"; }

# The node's state as sinfo prints it (idle, mixed, down*, ...), and the
# reason after a '|'.
node_state() { timeout 10 sinfo -h -N -o '%T|%E' 2>/dev/null | head -n 1; }

# Succeeds when the node is up and has registered since slurmctld started
# (before that, steps in running jobs cannot start). Prints the state.
node_ready() {
    local s st reason line
    s=$(node_state)
    st=${s%%|*}
    reason=${s#*|}
    [ -n "$st" ] || st="?"
    case $reason in "" | none) reason="" ;; *) reason=" ($reason)" ;; esac
    case $st in idle | mixed | allocated | completing) ;; *)
        echo "node $st$reason"
        return 1
        ;;
    esac
    line=$(timeout 10 scontrol show node -o 2>/dev/null) || line=""
    case $line in "" | *SlurmdStartTime=None*)
        echo "node $st, slurmd has not registered yet"
        return 1
        ;;
    esac
    echo "node $st$reason"
}

# --- cleanup of what the cluster left behind ---------------------------------

# Processes of this cluster: the daemons and slurmctld's slurmscriptd and
# slurmd's slurmstepd (the mark in their environment), the tasks of its
# jobs (SLURM_CONF of this cluster and SLURMD_NODENAME, which slurmstepd
# sets), everything in the sessions of the former (slurmstepd starts a
# session; its tasks get their own process groups) and the descendants of
# both. Never this script or its ancestors.
leftover_pids() {
    local d p st ppid sid joined changed
    local -A par=() ses=() hit=() marksid=() mine=()
    local -a env
    p=$$
    while [ -n "$p" ] && [ "$p" != 0 ] && [ -z "${mine[$p]:-}" ]; do
        mine[$p]=1
        { read -r st <"/proc/$p/stat"; } 2>/dev/null || break
        st=${st##*) }
        read -r _ p _ <<<"$st"
    done
    mine[$BASHPID]=1
    for d in /proc/[0-9]*; do
        p=${d#/proc/}
        { read -r st <"$d/stat"; } 2>/dev/null || continue
        st=${st##*) }
        read -r st ppid _ sid _ <<<"$st"
        [ "$st" != Z ] || continue
        par[$p]=$ppid
        ses[$p]=$sid
        [ -z "${mine[$p]:-}" ] || continue
        { mapfile -d '' -t env <"$d/environ"; } 2>/dev/null || continue
        [ ${#env[@]} -gt 0 ] || continue
        printf -v joined '\n%s' "${env[@]}"
        joined+=$'\n'
        case $joined in
        *$'\n'"$MARK"$'\n'*)
            hit[$p]=1
            marksid[$sid]=1
            ;;
        *$'\n'"SLURM_CONF=$CONF"$'\n'*)
            case $joined in *$'\n'SLURMD_NODENAME=*) hit[$p]=1 ;; esac
            ;;
        esac
    done
    for p in "${!ses[@]}"; do
        [ -z "${marksid[${ses[$p]}]:-}" ] || [ -n "${mine[$p]:-}" ] || hit[$p]=1
    done
    changed=1
    while [ $changed = 1 ]; do
        changed=0
        for p in "${!par[@]}"; do
            if [ -z "${hit[$p]:-}" ] && [ -z "${mine[$p]:-}" ] && [ -n "${hit[${par[$p]}]:-}" ]; then
                hit[$p]=1
                changed=1
            fi
        done
    done
    for p in "${!hit[@]}"; do
        if alive "$p"; then echo "$p"; fi
    done | sort -n
}

# The pids of $@ that are not slurmstepd (which ignores SIGTERM).
not_stepd() {
    local p c
    for p in "$@"; do
        c=$(cat "/proc/$p/comm" 2>/dev/null) || continue
        [ "$c" = slurmstepd ] || echo "$p"
    done
}

# Ends everything left (SIGTERM, SIGKILL after 10 s, or as soon as only
# slurmstepd is left); fails when something stays.
LEFT_PIDS=""
cleanup_leftovers() {
    local pids n=0
    pids=$(leftover_pids)
    [ -n "$pids" ] || return 0
    LEFT_PIDS="$LEFT_PIDS $pids"
    log "stopping processes left behind: $(words "$pids")"
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    # shellcheck disable=SC2046
    while [ $n -lt 20 ] && [ -n "$(not_stepd $(leftover_pids))" ]; do
        sleep 0.5
        n=$((n + 1))
    done
    pids=$(leftover_pids)
    if [ -n "$pids" ]; then
        log "killing processes left behind: $(words "$pids")"
        # shellcheck disable=SC2086
        kill -KILL $pids 2>/dev/null || true
        n=0
        while [ $n -lt 10 ] && [ -n "$(leftover_pids)" ]; do
            sleep 0.5
            n=$((n + 1))
        done
    fi
    pids=$(leftover_pids)
    [ -z "$pids" ] || die "could not end the processes left behind in $DIR: $(words "$pids")"
}

# --- stop --------------------------------------------------------------------

# Stops daemon $1 (pid $2): SIGTERM, SIGKILL after $3 seconds.
stop_daemon() {
    local name=$1 pid=$2 limit=$3 t0=$EPOCHREALTIME s0=$SECONDS
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ $((SECONDS - s0)) -lt "$limit" ]; do
        sleep 0.1
    done
    if alive "$pid"; then
        log "warning: $name (pid $pid) did not exit within $limit s of SIGTERM; killing it"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.5
    fi
    log "$name (pid $pid) stopped after $(since "$t0") s"
}

# Waits up to 10 s until the processes $@ have left /proc: a daemon started
# by an earlier run of this script is a child of init, which may reap it a
# few seconds late (until then `pgrep slurm` lists it as <defunct>).
wait_reaped() {
    local p n=0 left
    while [ $n -lt 50 ]; do
        left=""
        for p in "$@"; do [ ! -e "/proc/$p" ] || left="$left $p"; done
        [ -n "$left" ] || return 0
        sleep 0.2
        n=$((n + 1))
    done
    log "note: not reaped yet by their parent (zombies):$left"
}

do_stop() {
    local t0=$SECONDS pid jobs left limit stopped=""
    if [ -n "$(daemon_pid slurmctld)" ] && ctld_up; then
        jobs=$(timeout 20 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            timeout 20 scancel $jobs 2>/dev/null || log "warning: scancel failed"
            log "cancelled jobs: $(words "$jobs")"
            while :; do
                left=$(timeout 20 squeue -h -o '%i:%T' 2>/dev/null) || left="?"
                [ -n "$left" ] || break
                if [ $((SECONDS - t0)) -ge $((STOP_TIMEOUT / 2)) ]; then
                    log "warning: jobs still there after $((SECONDS - t0)) s: $(words "$left") (stopping anyway)"
                    break
                fi
                sleep 0.5
            done
        fi
    fi
    limit=$((STOP_TIMEOUT / 4))
    [ "$limit" -ge 5 ] || limit=5
    local name any=0
    for name in slurmd slurmctld munged; do
        pid=$(daemon_pid "$name")
        [ -n "$pid" ] || continue
        any=1
        stop_daemon "$name" "$pid" "$limit"
        stopped="$stopped $pid"
    done
    [ $any = 1 ] || log "no daemon running for $DIR"
    cleanup_leftovers
    # shellcheck disable=SC2086
    wait_reaped $stopped $LEFT_PIDS
    if ! ours; then
        log "$CONF is not one $me wrote: leaving DIR's files alone"
        return 0
    fi
    rm -f "$DIR/slurmctld.pid" "$DIR/slurmd.pid" "$DIR/munged.pid" "$ENVFILE"
    rm -rf "$STATE" "$SPOOL" "$MUNGE_DIR" || die "could not remove the state in $DIR"
}

# --- start -------------------------------------------------------------------

ensure_packages() {
    local p missing=""
    for p in $PACKAGES; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
            missing="$missing $p"
    done
    [ -n "$missing" ] || return 0
    command -v apt-get >/dev/null || die "missing packages:$missing, and no apt-get"
    local r0=$EPOCHREALTIME
    log "installing$missing (apt-get; log: $DIR/apt.log)"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
        >"$DIR/apt.log" 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 || true
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
            >>"$DIR/apt.log" 2>&1 || {
            log_tail "$DIR/apt.log"
            die "apt-get could not install$missing"
        }
    fi
    log "installed$missing in $(since "$r0") s"
}

# munged refuses a socket in a directory others cannot reach, and runs as
# the munge user, which must reach DIR/munge.
check_path() {
    local d=$DIR mode
    chmod go+x "$DIR"
    while [ "$d" != / ] && [ -n "$d" ]; do
        d=$(dirname "$d")
        mode=$(stat -c %A "$d")
        [ "${mode:9:1}" = x ] || [ "${mode:9:1}" = t ] ||
            die "$d is $mode: munged (user munge) needs every directory above its socket searchable by others (chmod o+x $d, or use a DIR elsewhere)"
    done
}

# Prints "CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore
# RealMemory" of this machine.
machine() {
    local line k v out=""
    line=$(env -u SLURM_CONF slurmd -C 2>/dev/null | head -n 1) || true
    for k in CPUs Boards SocketsPerBoard CoresPerSocket ThreadsPerCore RealMemory; do
        v=$(grep -o "\b$k=[0-9]*" <<<"$line" | cut -d= -f2) || true
        [ -n "$v" ] || die "cannot read $k from 'slurmd -C': $line"
        out="$out $v"
    done
    echo "$out"
}

write_config() {
    local host=$1 cpus boards sockets cores threads mem want_cpus want_mem node overrides=0
    read -r cpus boards sockets cores threads mem <<<"$(machine)"
    want_cpus=${SLURM_DEV_CPUS:-$cpus}
    want_mem=${SLURM_DEV_MEM_MB:-$((mem * 95 / 100))}
    [[ $want_cpus =~ ^[1-9][0-9]*$ ]] || die "SLURM_DEV_CPUS must be a positive number, got '$want_cpus'"
    [[ $want_mem =~ ^[1-9][0-9]*$ ]] || die "SLURM_DEV_MEM_MB must be a positive number, got '$want_mem'"
    if [ "$want_cpus" = "$cpus" ]; then
        node="CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads"
    else
        node="CPUs=$want_cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$want_cpus ThreadsPerCore=1"
        overrides=1
    fi
    [ "$want_mem" -le "$mem" ] || overrides=1
    cat >"$CONF" <<EOF
# Written by $me: a throwaway one-node cluster for end-to-end tests.
# This machine: CPUs=$cpus Boards=$boards SocketsPerBoard=$sockets CoresPerSocket=$cores ThreadsPerCore=$threads RealMemory=$mem
ClusterName=slotdev
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCK
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$SPOOL/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
SlurmctldDebug=$DEBUG
SlurmdDebug=$DEBUG
# No cgroups: processes tracked by parentage, memory scheduled but not enforced.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEF_MEM
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=$NODE_TIMEOUT
InactiveLimit=0
KillWait=2
MinJobAge=$MIN_JOB_AGE
EOF
    [ $overrides = 0 ] || echo "SlurmdParameters=config_overrides" >>"$CONF"
    cat >>"$CONF" <<EOF
NodeName=$host NodeAddr=127.0.0.1 $node RealMemory=$want_mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$CONF"
}

start_munged() {
    local pid
    rm -rf "$MUNGE_DIR"
    mkdir -m 0755 "$MUNGE_DIR"
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none ||
        die "could not write $MUNGE_DIR/munge.key"
    chmod 0400 "$MUNGE_DIR/munge.key"
    chown -R munge:munge "$MUNGE_DIR"
    # -F: in the foreground $! is munged, and it logs to stderr (not to
    # --log-file).
    (cd "$DIR" && exec env "$MARK" setsid setpriv --reuid=munge --regid=munge --clear-groups \
        munged -F --socket="$SOCK" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --seed-file="$MUNGE_DIR/munged.seed" \
        </dev/null >>"$DIR/munged.log" 2>&1) &
    pid=$!
    echo "$pid" >"$DIR/munged.pid"
}

# Starts slurmctld or slurmd ($1) in the foreground of its own session.
launch() {
    local name=$1 pid
    (cd "$DIR" && exec env "$MARK" SLURM_CONF="$CONF" setsid "$name" -D -f "$CONF" \
        </dev/null >>"$DIR/$name.stderr" 2>&1) &
    pid=$!
    echo "$pid" >"$DIR/$name.pid"
}

# Fails with the logs when a daemon started here is gone (by its pid alone:
# just after the start it may not have exec'd the daemon yet).
check_daemons() {
    local name pid
    for name in "$@"; do
        pid=$(cat "$DIR/$name.pid" 2>/dev/null) || pid=""
        if ! [[ $pid =~ ^[0-9]+$ ]] || ! alive "$pid"; then
            log "$name is not running any more"
            all_logs
            return 1
        fi
    done
}

fail_start() {
    log "stopping what was started"
    (do_stop) >/dev/null 2>&1 || true
    die "$@"
}

do_start() {
    local name pid host t0=$SECONDS r0=$EPOCHREALTIME state="" left out
    [ "$(id -u)" = 0 ] || die "run as root (SlurmUser=root, and munged runs as the munge user)"
    for name in munged slurmctld slurmd; do
        pid=$(daemon_pid "$name")
        [ -z "$pid" ] || die "$name for $DIR is already running (pid $pid); run '$me stop $DIR' first"
    done
    ensure_packages
    command -v setpriv >/dev/null || die "setpriv is missing (apt-get install util-linux)"
    id munge >/dev/null 2>&1 || die "there is no munge user (the munge package makes it)"
    local p
    for p in "$PORT" "$SLURMD_PORT"; do
        ! port_in_use "$p" ||
            die "port $p is already in use (the cluster needs ports $PORT-$SLURMD_PORT; set SLURM_DEV_PORT to another first port)"
    done
    if ! ours; then
        for p in "$CONF" "$STATE" "$SPOOL" "$MUNGE_DIR" "$ENVFILE"; do
            [ ! -e "$p" ] || die "$DIR holds $p, not from $me: use an empty or new DIR"
        done
    fi
    check_path
    # What a killed earlier run left.
    cleanup_leftovers
    rm -rf "$STATE" "$SPOOL" "$MUNGE_DIR"
    rm -f "$ENVFILE" "$DIR/slurmctld.pid" "$DIR/slurmd.pid" "$DIR/munged.pid"
    host=$(hostname -s)
    [ -n "$host" ] || die "hostname -s is empty"
    write_config "$host"
    mkdir -m 0755 "$STATE" "$SPOOL"
    for name in munged slurmctld slurmd; do
        : >"$DIR/$name.log"
        [ "$name" = munged ] || : >"$DIR/$name.stderr"
    done

    t0=$SECONDS
    r0=$EPOCHREALTIME
    log "starting munged (socket $SOCK)"
    start_munged
    while ! munge -S "$SOCK" -n 2>/dev/null | unmunge -S "$SOCK" >/dev/null 2>&1; do
        check_daemons munged || fail_start "munged exited during startup"
        [ $((SECONDS - t0)) -lt "$START_TIMEOUT" ] || {
            all_logs
            fail_start "munged did not answer on $SOCK within $START_TIMEOUT s"
        }
        sleep 0.2
    done
    log "starting slurmctld and slurmd (ports $PORT and $SLURMD_PORT, config $CONF)"
    launch slurmctld
    launch slurmd
    while :; do
        check_daemons munged slurmctld slurmd || fail_start "a daemon exited during startup (see above)"
        if ! ctld_up; then
            state="slurmctld does not answer scontrol ping"
        elif state=$(node_ready); then
            left=$((START_TIMEOUT - (SECONDS - t0)))
            [ "$left" -ge 5 ] || left=5
            if out=$(timeout "$left" srun -N1 -J slurm-dev-check -t 1 true 2>&1); then
                break
            fi
            state="$state; srun -N1 true failed: $(words "$out")"
        else
            case $state in *inval* | *drain* | *fail*)
                all_logs
                fail_start "the node is not usable: $state (see slurmd.log)"
                ;;
            esac
        fi
        if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
            all_logs
            fail_start "the cluster was not ready within $START_TIMEOUT s: $state"
        fi
        sleep 0.5
    done
    echo "SLURM_CONF=$CONF" >"$ENVFILE"
    log "ready in $(since "$r0") s: $state; srun -N1 true works"
    echo "SLURM_CONF=$CONF"
}

# --- restart-ctld ------------------------------------------------------------

do_restart_ctld() {
    local pid t0=$SECONDS r0=$EPOCHREALTIME state="" limit
    [ -f "$CONF" ] || die "no $CONF: start the cluster first"
    [ -n "$(daemon_pid munged)" ] || die "munged is not running for $DIR: start the cluster first"
    [ -n "$(daemon_pid slurmd)" ] || log "warning: slurmd is not running for $DIR"
    pid=$(daemon_pid slurmctld)
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null || true
        limit=$STOP_TIMEOUT
        while alive "$pid" && [ $((SECONDS - t0)) -lt "$limit" ]; do
            sleep 0.1
        done
        if alive "$pid"; then
            log_tail "$DIR/slurmctld.stderr"
            die "slurmctld (pid $pid) did not exit within $limit s of SIGTERM"
        fi
        log "slurmctld (pid $pid) stopped after $(since "$r0") s; starting it again"
    else
        log "slurmctld is not running; starting it"
    fi
    t0=$SECONDS
    r0=$EPOCHREALTIME
    launch slurmctld
    while :; do
        if ! check_daemons slurmctld; then
            die "slurmctld exited during startup"
        fi
        if ! ctld_up; then
            state="slurmctld does not answer scontrol ping"
        elif state=$(node_ready); then
            break
        fi
        if [ $((SECONDS - t0)) -ge "$START_TIMEOUT" ]; then
            log_tail "$DIR/slurmctld.stderr"
            die "slurmctld was not ready within $START_TIMEOUT s: $state"
        fi
        sleep 0.2
    done
    log "slurmctld answers again after $(since "$r0") s: $state"
    echo "SLURM_CONF=$CONF"
}

# --- status ------------------------------------------------------------------

do_status() {
    local name pid n=0 rc=0 state jobs
    for name in munged slurmctld slurmd; do
        pid=$(daemon_pid "$name")
        if [ -n "$pid" ]; then
            echo "$name: running (pid $pid)"
            n=$((n + 1))
        else
            echo "$name: not running"
        fi
    done
    if [ $n = 0 ]; then
        echo "not running ($DIR)"
        return 3
    fi
    [ $n = 3 ] || rc=1
    echo "SLURM_CONF=$CONF"
    if ! ctld_up; then
        echo "slurmctld does not answer scontrol ping"
        return 1
    fi
    state=$(node_ready) || rc=1
    echo "$state"
    jobs=$(timeout 10 squeue -h -o '%i %j %T %r' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        echo "jobs:"
        echo "$jobs"
    else
        echo "no jobs"
    fi
    return $rc
}

case $cmd in
start) do_start ;;
stop) do_stop ;;
restart-ctld) do_restart_ctld ;;
status)
    rc=0
    do_status || rc=$?
    exit $rc
    ;;
esac
