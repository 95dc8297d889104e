#!/usr/bin/env bash
# Generate the deployment's secrets: a CA, the SuperLink's TLS certificate (signed by
# the CA) and one ECDSA key pair per SuperNode for SuperNode authentication.
#
#   deploy/certs.sh [-o DIR] [-n NUM_SUPERNODES] [-u OWNER] [NAME_OR_IP ...]
#
# DIR defaults to deploy/certs (git-ignored). The certificate is valid for
# superlink, localhost, 127.0.0.1 and every NAME_OR_IP given: list each address the
# SuperNodes, SuperExecs and `flwr` use to reach the SuperLink on other hosts.
# Files: ca.crt (give it to every SuperNode and to `flwr`), ca.key (keep it safe),
# superlink.{crt,key}, supernode-<i> (private key, stays on node i) and
# supernode-<i>.pub (register with `flwr supernode register`). Private keys are
# readable by their owner only; `-u 49999` (as root) hands them to the user that
# Flower's Docker images run as.
set -euo pipefail
out=deploy/certs
nodes=2
owner=
while getopts "o:n:u:" opt; do
  case $opt in
    o) out=$OPTARG ;;
    n) nodes=$OPTARG ;;
    u) owner=$OPTARG ;;
    *) echo "usage: $0 [-o DIR] [-n NUM_SUPERNODES] [-u OWNER] [NAME_OR_IP ...]" >&2
       exit 2 ;;
  esac
done
shift $((OPTIND - 1))

san="DNS:superlink,DNS:localhost,IP:127.0.0.1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"
  else san+=",DNS:$name"; fi
done

umask 077
mkdir -p "$out"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes -days 365 \
  -subj "/CN=fedlora CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -nodes \
  -subj "/CN=superlink" -keyout "$out/superlink.key" -out "$out/superlink.csr" \
  2>/dev/null
openssl x509 -req -in "$out/superlink.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" \
  -CAcreateserial -days 365 -out "$out/superlink.crt" \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "$san") \
  2>/dev/null
rm -f "$out/superlink.csr" "$out/ca.srl"
for ((i = 0; i < nodes; i++)); do
  rm -f "$out/supernode-$i" "$out/supernode-$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "$out/supernode-$i"
done
chmod 755 "$out"
chmod 644 "$out/ca.crt" "$out/superlink.crt" "$out"/supernode-*.pub
if [[ -n $owner ]]; then
  chown "$owner" "$out/superlink.key"
  for ((i = 0; i < nodes; i++)); do chown "$owner" "$out/supernode-$i"; done
fi
echo "wrote $out: ca.crt, superlink.crt/.key (SAN $san), $nodes SuperNode key pairs"
