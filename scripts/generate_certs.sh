#!/usr/bin/env bash
# Certificates and keys for a fedlayer deployment (TLS + SuperNode authentication).
#
#   scripts/generate_certs.sh [-o DIR] [-n NODES] [-s SAN]...
#       DIR/ca.crt, ca.key          a private CA (10 years)
#       DIR/server.pem, server.key  the SuperLink's certificate, signed by the CA, with
#                                   subjectAltName DNS:localhost, IP:127.0.0.1,
#                                   DNS:superlink (the compose service) and every -s SAN
#                                   (e.g. -s DNS:fl.example.org -s IP:203.0.113.7: the
#                                   name/address the devices use to reach the SuperLink)
#       DIR/keys/snI, snI.pub       one EC P-384 key pair per SuperNode (OpenSSH format)
#     Existing files are kept, so raising -n later only adds keys (use -f to
#     start over). Needs openssl and ssh-keygen.
#
#   scripts/generate_certs.sh [-o DIR] -r CONNECTION [PUBKEY...]
#       Register public keys (default: all DIR/keys/*.pub) with a running SuperLink
#       through `flwr supernode register PUBKEY CONNECTION`; CONNECTION is a
#       [superlink.<name>] entry in $FLWR_HOME/config.toml (root-certificates = DIR/ca.crt).
#       Keys already registered are reported and skipped.
set -euo pipefail

out=certs
nodes=2
sans=()
register=""
force=0
days=3650

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while getopts "o:n:s:r:fh" opt; do
  case "$opt" in
    o) out=$OPTARG ;;
    n) nodes=$OPTARG ;;
    s) sans+=("$OPTARG") ;;
    r) register=$OPTARG ;;
    f) force=1 ;;
    h) usage 0 ;;
    *) usage 2 ;;
  esac
done
shift $((OPTIND - 1))

if [[ -n "$register" ]]; then
  command -v flwr >/dev/null || { echo "flwr not found (pip install flwr==1.39.0)" >&2; exit 1; }
  if [[ $# -gt 0 ]]; then pubkeys=("$@"); else pubkeys=("$out"/keys/*.pub); fi
  [[ -e "${pubkeys[0]}" ]] || { echo "no public keys in $out/keys" >&2; exit 1; }
  export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
  status=0
  for key in "${pubkeys[@]}"; do
    if output=$(flwr supernode register "$key" "$register" 2>&1); then
      echo "registered $key"
    elif grep -qi "already" <<<"$output"; then
      echo "already registered: $key"
    else
      echo "failed to register $key:" >&2
      echo "$output" >&2
      status=1
    fi
  done
  exit "$status"
fi

[[ "$nodes" =~ ^[0-9]+$ ]] || { echo "-n must be a number" >&2; exit 2; }
for tool in openssl ssh-keygen; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done

mkdir -p "$out/keys"
umask 077
if [[ $force -eq 1 ]]; then
  rm -f "$out"/ca.* "$out"/server.* "$out"/keys/sn*
fi

if [[ ! -f "$out/ca.crt" ]]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
    -days "$days" -subj "/CN=fedlayer CA" -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
  echo "created $out/ca.crt"
fi

if [[ ! -f "$out/server.pem" ]]; then
  san="DNS:localhost,IP:127.0.0.1,DNS:superlink"
  for extra in "${sans[@]}"; do san="$san,$extra"; done
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-384 -sha384 -nodes \
    -subj "/CN=superlink" -keyout "$out/server.key" -out "$out/server.csr" 2>/dev/null
  openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial \
    -days "$days" -sha384 -out "$out/server.pem" \
    -extfile <(printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$san") \
    2>/dev/null
  rm -f "$out/server.csr" "$out/ca.srl"
  echo "created $out/server.pem ($san)"
fi

for ((i = 0; i < nodes; i++)); do
  key="$out/keys/sn$i"
  if [[ ! -f "$key" ]]; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "$key"
    echo "created $key (+ .pub)"
  fi
done

# Certificates and public keys are not secret; private keys stay owner-only.
chmod 644 "$out/ca.crt" "$out/server.pem" "$out"/keys/*.pub 2>/dev/null || true
echo "done. Keep $out/ca.key offline; give each device ca.crt and its own keys/snI."
