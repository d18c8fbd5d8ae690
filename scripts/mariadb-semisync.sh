#!/usr/bin/env bash
# Two local MariaDB servers of their own, a primary and a replica with semi-synchronous GTID
# replication, each with its own port and data directory under DIR (never the system server):
#
#   mariadb-semisync.sh start DIR [--async]  initialise and start both, replicate, and wait
#                                            until the replica acknowledges the primary's
#                                            commits; --async turns semi-sync off (known unsafe)
#   mariadb-semisync.sh disconnect DIR       the replica stops receiving (its IO thread stopped),
#                                            as over a broken link: it falls behind
#   mariadb-semisync.sh crash-primary DIR    SIGKILL the primary and wait until it is gone
#   mariadb-semisync.sh promote DIR          once the primary is gone: apply the replica's whole
#                                            relay log, then make it a writable primary
#   mariadb-semisync.sh status DIR           the replication status of both
#   mariadb-semisync.sh stop DIR             stop whichever of the two still runs
#
# Semi-sync with wait point AFTER_SYNC: the primary writes and syncs a commit to its binary log,
# waits until a replica has written it to its relay log, and only then commits it in the
# storage engine and answers the client. A commit that was answered is on the replica.
# The primary waits TCORE_SEMISYNC_TIMEOUT_MS for that acknowledgement (also when no replica
# is connected) before it falls back to asynchronous replication; the default is long enough
# that it never does during a test (`Rpl_semi_sync_master_no_tx` counts the commits it
# answered without one).
#
# Settings (environment):
#   TCORE_SEMISYNC_PORTS       the primary's and the replica's ports       ("3307 3308")
#   TCORE_SEMISYNC_TIMEOUT_MS  rpl_semi_sync_master_timeout                 (3600000)
# Both servers listen on 127.0.0.1 only; root has no password (mysql://root@127.0.0.1:PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

usage() {
    echo "usage: $0 start DIR [--async] | disconnect DIR | crash-primary DIR | promote DIR | status DIR | stop DIR" >&2
    exit 2
}
[ $# -ge 2 ] || usage
command="$1"
dir="$(realpath -m "$2")"
shift 2

mariadbd_bin=$(command -v mariadbd || echo /usr/sbin/mariadbd)
# mariadbd refuses to run as root unless told to; as anyone else it runs as that user.
user_args=()
[ "$(id -u)" = 0 ] && user_args=(--user=root)

die() {
    echo "mariadb-semisync: $*" >&2
    exit 1
}

# SQL on one instance (`primary` or `replica`), through its socket, rows tab-separated.
sql() {
    mariadb --no-defaults --socket="$dir/$1/mariadbd.sock" -uroot -N -B -e "$2"
}
status_var() {
    sql "$1" "SHOW GLOBAL STATUS LIKE '$2'" | cut -f2
}
slave_field() {
    mariadb --no-defaults --socket="$dir/replica/mariadbd.sock" -uroot -e 'SHOW SLAVE STATUS\G' \
        | awk -v field="$1:" '$1 == field { $1 = ""; sub(/^ /, ""); print }'
}
instance_pid() {
    cat "$dir/$1/mariadbd.pid" 2>/dev/null || true
}
# Whether process `pid` runs (a killed one may linger as a zombie until its parent reaps it).
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [ "${stat:0:1}" != Z ]
}
port_taken() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# The configuration of one instance: `name`, server id, port, then the role's own lines.
write_config() {
    local name="$1" server_id="$2" port="$3"
    shift 3
    {
        echo "[mariadbd]"
        echo "datadir=$dir/$name/data"
        echo "socket=$dir/$name/mariadbd.sock"
        echo "pid-file=$dir/$name/mariadbd.pid"
        echo "log-error=$dir/$name/error.log"
        echo "port=$port"
        echo "bind-address=127.0.0.1"
        echo "skip-name-resolve"
        echo "server-id=$server_id"
        # GTID replication of whole transactions, each synced to the binary log at commit.
        echo "log-bin=binlog"
        echo "relay-log=relay"
        echo "binlog-format=ROW"
        echo "sync-binlog=1"
        echo "innodb-flush-log-at-trx-commit=1"
        echo "log-slave-updates"
        echo "gtid-strict-mode"
        echo "innodb-buffer-pool-size=64M"
        echo "rpl-semi-sync-master-wait-point=AFTER_SYNC"
        echo "rpl-semi-sync-master-timeout=$timeout_ms"
        echo "rpl-semi-sync-master-wait-no-slave=ON"
        printf '%s\n' "$@"
    } >"$dir/$name/my.cnf"
}

start_instance() {
    local name="$1" port="$2" pid
    port_taken "$port" && die "port $port is taken (TCORE_SEMISYNC_PORTS)"
    "$mariadbd_bin" --defaults-file="$dir/$name/my.cnf" "${user_args[@]}" >>"$dir/$name/error.log" 2>&1 &
    pid=$!
    wait_until "MariaDB $name" "$pid" "$dir/$name/error.log" 30 sql "$name" "SELECT 1"
}

start() {
    local mode=semisync
    case "${1:-}" in
        --async) mode=async ;;
        "") ;;
        *) usage ;;
    esac
    read -r primary_port replica_port <<<"${TCORE_SEMISYNC_PORTS:-3307 3308}"
    timeout_ms="${TCORE_SEMISYNC_TIMEOUT_MS:-3600000}"
    [ -e "$dir/primary" ] && die "$dir already holds servers; stop them and remove it first"
    mkdir -p "$dir/primary" "$dir/replica"
    printf 'mode=%s\nprimary_port=%s\nreplica_port=%s\n' "$mode" "$primary_port" "$replica_port" >"$dir/servers"

    # One initialised data directory, copied: both start from the same empty state, with no
    # binary log yet, so the replica needs no snapshot of the primary.
    mariadb-install-db --no-defaults --datadir="$dir/primary/data" --auth-root-authentication-method=normal \
        --skip-test-db "${user_args[@]}" >"$dir/install.log" 2>&1 || die "mariadb-install-db failed; see $dir/install.log"
    cp -a "$dir/primary/data" "$dir/replica/data"

    local semisync=ON
    [ "$mode" = async ] && semisync=OFF
    write_config primary 1 "$primary_port" "rpl-semi-sync-master-enabled=$semisync"
    # The replica does not wait for replicas of its own: promoted, it serves alone until a new
    # replica is attached (with semi-sync on and none connected it would answer no commit).
    write_config replica 2 "$replica_port" "rpl-semi-sync-slave-enabled=$semisync" "read-only"
    start_instance primary "$primary_port"
    start_instance replica "$replica_port"

    # The replication user, on each server alone: a replicated write would wait for a replica's
    # acknowledgement before any replica is connected.
    local server
    for server in primary replica; do
        sql "$server" "SET SESSION sql_log_bin = 0; CREATE USER 'repl'@'127.0.0.1' IDENTIFIED BY 'repl';
            GRANT REPLICATION SLAVE ON *.* TO 'repl'@'127.0.0.1';"
    done
    sql replica "CHANGE MASTER TO MASTER_HOST = '127.0.0.1', MASTER_PORT = $primary_port,
        MASTER_USER = 'repl', MASTER_PASSWORD = 'repl', MASTER_USE_GTID = slave_pos, MASTER_CONNECT_RETRY = 1;
        START SLAVE;"
    if [ "$mode" = semisync ]; then
        semisync_up() {
            [ "$(status_var primary Rpl_semi_sync_master_clients)" = 1 ] \
                && [ "$(status_var primary Rpl_semi_sync_master_status)" = ON ] \
                && [ "$(status_var replica Rpl_semi_sync_slave_status)" = ON ]
        }
        wait_until "semi-sync" "$(instance_pid primary)" "$dir/primary/error.log" 30 semisync_up
    fi
    # A write that reaches the replica proves the stream runs.
    sql primary "CREATE DATABASE replication_check; DROP DATABASE replication_check;"
    local position
    position=$(sql primary "SELECT @@gtid_binlog_pos")
    [ "$(sql replica "SELECT MASTER_GTID_WAIT('$position', 30)")" = 0 ] \
        || die "the replica did not reach $position; see $dir/replica/error.log"
    echo "primary  mysql://root@127.0.0.1:$primary_port (pid $(instance_pid primary))"
    echo "replica  mysql://root@127.0.0.1:$replica_port (pid $(instance_pid replica)), replication $mode"
}

crash_primary() {
    local pid
    pid=$(instance_pid primary)
    [ -n "$pid" ] && alive "$pid" || die "the primary does not run"
    kill -9 "$pid"
    for _ in $(seq 1 100); do
        alive "$pid" || return 0
        sleep 0.1
    done
    die "the primary (pid $pid) outlived SIGKILL for 10 s"
}

# A failover: the primary must be gone (it is not fenced here). Every event the replica
# received is applied before it takes writes: with semi-sync, its relay log holds every
# commit the primary answered. A transaction cut off mid-way stays out; its client was never
# answered.
promote() {
    local pid state
    pid=$(instance_pid primary)
    if [ -n "$pid" ] && alive "$pid"; then
        die "the primary (pid $pid) still runs: stop it before promoting its replica"
    fi
    sql replica "STOP SLAVE IO_THREAD"
    for _ in $(seq 1 300); do
        state=$(slave_field Slave_SQL_Running_State)
        case "$state" in *"read all relay log"*) break ;; esac
        [ "$(slave_field Slave_SQL_Running)" = Yes ] || die "the replica's SQL thread stopped: $(slave_field Last_SQL_Error)"
        sleep 0.2
    done
    case "$state" in *"read all relay log"*) ;; *) die "the replica did not apply its relay log within 60 s ($state)" ;; esac
    echo "replica applied its relay log: received $(slave_field Gtid_IO_Pos), applied $(sql replica 'SELECT @@gtid_slave_pos')"
    sql replica "STOP SLAVE; RESET SLAVE ALL; SET GLOBAL read_only = OFF;"
    echo "replica promoted: mysql://root@127.0.0.1:$replica_port"
}

status() {
    local name
    for name in primary replica; do
        if sql "$name" "SELECT 1" >/dev/null 2>&1; then
            echo "== $name"
            sql "$name" "SHOW GLOBAL STATUS WHERE Variable_name IN ('Rpl_semi_sync_master_status',
                'Rpl_semi_sync_master_clients', 'Rpl_semi_sync_master_yes_tx', 'Rpl_semi_sync_master_no_tx',
                'Rpl_semi_sync_slave_status')"
            sql "$name" "SELECT 'gtid_current_pos', @@gtid_current_pos"
        else
            echo "== $name: not running"
        fi
    done
}

stop() {
    local name pid
    for name in primary replica; do
        pid=$(instance_pid "$name")
        [ -n "$pid" ] && kill "$pid" 2>/dev/null || continue
        for _ in $(seq 1 100); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    done
}

if [ "$command" != start ]; then
    [ -f "$dir/servers" ] || die "no servers in $dir"
    # shellcheck source=/dev/null
    source "$dir/servers"
fi
case "$command" in
    start) start "$@" ;;
    disconnect) sql replica "STOP SLAVE IO_THREAD" ;;
    crash-primary) crash_primary ;;
    promote) promote ;;
    status) status ;;
    stop) stop ;;
    *) usage ;;
esac
