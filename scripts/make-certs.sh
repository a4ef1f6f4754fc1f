#!/usr/bin/env bash
# Makes a self-signed CA and certificates for expertmesh's TLS (tests, trials;
# use your own PKI in production). Needs the openssl command.
#
#   scripts/make-certs.sh OUT_DIR [EXTRA_NAME...]
#
# writes OUT_DIR/ca.pem ca.key (the CA), server.pem server.key (names:
# localhost, 127.0.0.1, ::1, this host's name and any EXTRA_NAME; usable for
# server and client authentication, so `launch` workers can present it for
# mTLS), client.pem client.key (client authentication). Keys are ECDSA
# P-256, readable by the owner only; certificates last 30 days.
#
#   expertmesh coordinator --tls-cert OUT/server.pem --tls-key OUT/server.key --tls-client-ca OUT/ca.pem ...
#   expertmesh worker --tls-ca OUT/ca.pem --tls-cert OUT/client.pem --tls-key OUT/client.key ...
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 OUT_DIR [EXTRA_NAME...]" >&2
  exit 2
fi
out=$1
shift
command -v openssl >/dev/null || { echo "$0: openssl not found (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$out"
umask 077
days=30
host=$(hostname)
san="DNS:localhost,IP:127.0.0.1,IP:0:0:0:0:0:0:0:1,DNS:${host}"
fqdn=$(hostname -f 2>/dev/null || true)
if [[ -n "$fqdn" && "$fqdn" != "$host" ]]; then san="$san,DNS:$fqdn"; fi
for n in "$@"; do
  if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then san="$san,IP:$n"; else san="$san,DNS:$n"; fi
done

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key "$out/ca.key"
openssl req -x509 -new -key "$out/ca.key" -sha256 -days "$days" -subj "/CN=expertmesh test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out "$out/ca.pem"

sign() {  # name subject extensions
  local name=$1 subject=$2 ext=$3
  key "$out/$name.key"
  openssl req -new -key "$out/$name.key" -subj "$subject" -out "$out/$name.csr"
  printf '%b' "$ext" > "$out/$name.ext"
  openssl x509 -req -in "$out/$name.csr" -CA "$out/ca.pem" -CAkey "$out/ca.key" -CAcreateserial -days "$days" \
    -sha256 -extfile "$out/$name.ext" -out "$out/$name.pem" 2>/dev/null
  rm -f "$out/$name.csr" "$out/$name.ext"
}
sign server "/CN=expertmesh coordinator" \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=$san\n"
sign client "/CN=expertmesh client" \
  "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
rm -f "$out/ca.srl"
chmod 644 "$out"/*.pem
echo "certificates in $out: ca.pem, server.pem/.key ($san), client.pem/.key"
