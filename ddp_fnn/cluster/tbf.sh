# Sourced by launch/node.sh and launch/netns-cluster.sh: one definition of the token
# bucket (tc tbf) that shapes a node's egress, so that a rate set at start and a rate
# changed mid-run get the same bucket.
#
#   tbf_rate_bytes RATE          bytes/s of a tc rate (1gbit, 100mbit, 12500kbps); status 1
#                                if RATE is not one
#   tbf_params RATE MTU [LIMIT]  the tbf parameters: "rate RATE burst B latency 50ms", or
#                                "... limit LIMIT" (a queue of LIMIT bytes) when LIMIT is given
#   tbf_port_params RATE MTU LIMIT  a switch port: the rate, a bucket of 16 frames (a port
#                                serialises at line rate, it stores no tokens to burst with)
#                                and a queue of LIMIT bytes
#
# The bucket (burst) holds 4 ms of traffic at the rate (rate/250), and at least 16
# full-size frames so a single TCP window's worth of MTU-sized packets is never dropped
# outright. The queue behind it holds 50 ms of backlog, or LIMIT bytes: a shallow buffer
# (a switch port with little memory) that tail-drops the rest of a burst.

tbf_rate_bytes() {
    awk -v r="$1" 'BEGIN {
        if (!match(tolower(r), /^[0-9]+(\.[0-9]+)?/)) exit 1
        v = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
        if (u ~ /^(bit)?$/) m = 1/8; else if (u == "bps") m = 1
        else if (u ~ /^[kmgt]i?(bit|bps)$/) {
            p = index("kmgt", substr(u, 1, 1)); base = (substr(u, 2, 1) == "i") ? 1024 : 1000
            m = base ^ p; if (u ~ /bit$/) m /= 8
        } else exit 1
        b = v * m; if (b < 1) exit 1
        printf "%d\n", b }'
}

tbf_params() {
    local rate=$1 mtu=$2 limit=${3:-} bytes burst
    bytes=$(tbf_rate_bytes "$rate") || return 1
    burst=$(( bytes / 250 ))
    (( burst >= 16 * mtu )) || burst=$(( 16 * mtu ))
    if [ -n "$limit" ]; then
        echo "rate $rate burst $burst limit $limit"
    else
        echo "rate $rate burst $burst latency 50ms"
    fi
}

tbf_port_params() {
    tbf_rate_bytes "$1" >/dev/null || return 1
    echo "rate $1 burst $(( 16 * $2 )) limit $3"
}
