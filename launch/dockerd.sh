#!/usr/bin/env bash
# A private Docker daemon for the compose simulation and its test, that leaves the host
# as it found it:
#
#   launch/dockerd.sh start [DIR]     start one (or find it running); prints DOCKER_HOST=...
#   launch/dockerd.sh stop [DIR]      stop it, then check the host's firewall and sysctls
#
# DIR (default /run/ddp-fnn-docker) holds its socket, pid file, log and the host's state
# saved at start. Images live in /var/lib/ddp-fnn-docker (kept between starts: a warm
# image build reuses them).
#
# A stock dockerd sets the host's iptables FORWARD policy to DROP, turns on
# net.bridge.bridge-nf-call-iptables and IP forwarding, and NATs its bridges: a bridge in
# the host's own namespace then drops its traffic. This one runs with --iptables=false
# --ip-forward=false --ip-masq=false --bridge=none: containers on one compose network
# reach each other over its bridge and nothing else (the network the compose files give
# it is `internal` offline anyway), and the host's firewall and sysctls are not touched.
# `stop` compares them with what `start` saved and puts back anything that differs,
# saying what it restored. Root only.
set -euo pipefail
prog=dockerd.sh
die() { echo "$prog: error: $*" >&2; exit 2; }
cmd=${1:-}
dir=${2:-/run/ddp-fnn-docker}
[ "$(id -u)" = 0 ] || die "must run as root (dockerd)"
sock="$dir/docker.sock"
export DOCKER_HOST="unix://$sock"
sysctls=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables)

save_host() {
    iptables-save 2>/dev/null | grep -v '^#' > "$dir/iptables.before" || true
    : > "$dir/sysctl.before"
    for s in "${sysctls[@]}"; do
        v=$(sysctl -n "$s" 2>/dev/null) && echo "$s=$v" >> "$dir/sysctl.before"
    done
}

restore_host() {
    if [ -f "$dir/iptables.before" ] && command -v iptables-save >/dev/null; then
        if ! diff -q <(iptables-save 2>/dev/null | grep -v '^#') "$dir/iptables.before" >/dev/null; then
            iptables-restore < "$dir/iptables.before"
            echo "$prog: the host's iptables rules had changed; restored" >&2
        fi
    fi
    if [ -f "$dir/sysctl.before" ]; then
        while IFS='=' read -r s v; do
            [ "$(sysctl -n "$s" 2>/dev/null)" = "$v" ] && continue
            sysctl -qw "$s=$v" && echo "$prog: $s had changed; restored to $v" >&2
        done < "$dir/sysctl.before"
    fi
}

answers() { docker info >/dev/null 2>&1; }

case $cmd in
    start)
        command -v dockerd >/dev/null || die "dockerd is not installed (Debian: apt-get install docker.io)"
        command -v docker >/dev/null || die "docker (the client) is not installed"
        mkdir -p "$dir"
        if answers; then echo "DOCKER_HOST=$DOCKER_HOST"; exit 0; fi
        save_host
        dockerd --host "$DOCKER_HOST" --pidfile "$dir/dockerd.pid" --exec-root "$dir/exec" \
            --data-root /var/lib/ddp-fnn-docker --iptables=false --ip6tables=false --ip-forward=false \
            --ip-masq=false --bridge=none > "$dir/dockerd.log" 2>&1 &
        pid=$!
        # Until the daemon answers on its socket (a condition), or gives up.
        for _ in $(seq 1 600); do
            answers && break
            kill -0 "$pid" 2>/dev/null || { tail -n 3 "$dir/dockerd.log" >&2; die "dockerd exited at start (log: $dir/dockerd.log)"; }
            sleep 0.1
        done
        answers || { kill "$pid" 2>/dev/null; die "dockerd did not answer within 60 s (log: $dir/dockerd.log)"; }
        echo "DOCKER_HOST=$DOCKER_HOST"
        ;;
    stop)
        if [ -f "$dir/dockerd.pid" ] && pid=$(cat "$dir/dockerd.pid") && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid"
            for _ in $(seq 1 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; echo "$prog: dockerd did not stop in 30 s; killed" >&2; }
        fi
        # What the daemon mounted under its exec root and left (its network namespace
        # handles, /run/docker/netns/default among them).
        findmnt -rn -o TARGET | grep -F "$dir/exec/" | sort -r | while read -r m; do umount -l "$m" || true; done
        restore_host
        rm -f "$sock" "$dir/dockerd.pid"
        ;;
    *) die "usage: launch/dockerd.sh start|stop [DIR]" ;;
esac
