#!/bin/sh
# The injector's certificate without cert-manager: a CA and a server certificate made here with
# openssl, the Secret meshkeeper-injector-tls, and the CA patched into the webhook's caBundle.
# Run after `kubectl apply -k deploy/kubernetes`; re-run to rotate (the injector re-reads the files).
# Needs openssl and kubectl with rights on the Secret and the MutatingWebhookConfiguration.
set -eu
NAMESPACE=meshkeeper-system
SERVICE=meshkeeper-injector
WEBHOOK=meshkeeper-sidecar-injector
DAYS=${DAYS:-365}
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days "$DAYS" \
  -subj "/CN=meshkeeper-injector-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$SERVICE.$NAMESPACE.svc" -keyout "$dir/tls.key" -out "$dir/tls.csr"
printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:%s.%s.svc,DNS:%s.%s.svc.cluster.local\n' \
  "$SERVICE" "$NAMESPACE" "$SERVICE" "$NAMESPACE" > "$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days "$DAYS" -extfile "$dir/ext" -out "$dir/tls.crt"

kubectl -n "$NAMESPACE" create secret tls meshkeeper-injector-tls \
  --cert="$dir/tls.crt" --key="$dir/tls.key" --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 < "$dir/ca.crt" | tr -d '\n')
kubectl patch mutatingwebhookconfiguration "$WEBHOOK" --type=json -p "[
  {\"op\": \"add\", \"path\": \"/webhooks/0/clientConfig/caBundle\", \"value\": \"$ca\"},
  {\"op\": \"add\", \"path\": \"/webhooks/1/clientConfig/caBundle\", \"value\": \"$ca\"}]"
echo "meshkeeper-injector-tls created and caBundle set on $WEBHOOK"
