#!/usr/bin/env bash
# Install `meshd agent` as a systemd service on a worker host of a `ray up` cluster; run as
# root by worker_setup_commands in cluster/ray/meshd-*.yaml (docs/deploy.md "ray up").
#
#   install-agent.sh HEAD_IP SECRETS_DIR JOIN_TOKEN_FILE
#
# Installs the mesh's KV secret (/etc/meshd/kv_secret, 0600, the agent's user), the hardened
# unit (cluster/systemd/meshd-agent.service) and /etc/meshd/agent.env (0600, read by systemd
# as root): the coordinator's address, the address this host reaches the head from (the one
# the coordinator sees it connect from, where its workers must listen), and the join token.
# The token goes to the agent's environment, never its command line (which any local user can
# read). DESTDIR, MESHD_USER and SYSTEMCTL exist for tests/test_cluster_ray.py.
set -euo pipefail
head_ip=${1:?usage: install-agent.sh HEAD_IP SECRETS_DIR JOIN_TOKEN_FILE}
secrets=${2:?usage: install-agent.sh HEAD_IP SECRETS_DIR JOIN_TOKEN_FILE}
token_file=${3:?usage: install-agent.sh HEAD_IP SECRETS_DIR JOIN_TOKEN_FILE}
root=$(cd "$(dirname "$0")/../.." && pwd)
dest=${DESTDIR:-}
user=${MESHD_USER:-meshd}
port=${MESHD_GRPC_PORT:-50151}

own_ip=$(ip -o route get "$head_ip" | sed -n 's/.* src \([^ ]*\).*/\1/p')
if [ -z "$own_ip" ]; then
    echo "install-agent.sh: no route from this host to the head $head_ip" >&2
    exit 1
fi
token=$(head -n 1 "$token_file")
case $token in
    mjt_*.*) ;;
    *) echo "install-agent.sh: $token_file holds no join token (meshd trust token)" >&2
       exit 1 ;;
esac

coordinator="$head_ip:$port"
case $head_ip in *:*) coordinator="[$head_ip]:$port" ;; esac

install -d -m 0755 "$dest/etc/meshd" "$dest/etc/systemd/system"
install -m 0600 -o "$user" -g "$(id -gn "$user")" "$secrets/kv_secret" "$dest/etc/meshd/kv_secret"
umask 077
tmp=$(mktemp "$dest/etc/meshd/.agent.env.XXXXXX")
printf 'MESHD_AGENT_COORDINATOR=%s\nMESHD_AGENT_HOST=%s\nMESHD_AGENT_JOIN_TOKEN=%s\n' \
    "$coordinator" "$own_ip" "$token" > "$tmp"
mv "$tmp" "$dest/etc/meshd/agent.env"
install -m 0644 "$root/cluster/systemd/meshd-agent.service" \
    "$dest/etc/systemd/system/meshd-agent.service"
"${SYSTEMCTL:-systemctl}" daemon-reload
"${SYSTEMCTL:-systemctl}" enable meshd-agent
echo "meshd agent installed: coordinator $coordinator, this host $own_ip"
