# Shared by the scripts that start live engine nodes; source it.

# Waits for the node `name` (process `pid`, log `log`) to answer `url`/readyz, for up to 20 s;
# fails, pointing at the log, if it stops or never answers.
wait_ready() {
    local name="$1" url="$2" pid="$3" log="$4"
    for _ in $(seq 1 100); do
        curl -sf "$url/readyz" >/dev/null && return 0
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    echo "$name did not become ready; see $log" >&2
    return 1
}
