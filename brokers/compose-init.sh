#!/bin/sh
# docker-compose.yml's one-shot `init` service. On first start it creates the broker's
# accounts, ACL and development certificates in the `secure` volume with
# `streampipe broker init-secure`, then hands each secret to the one user that reads it:
# the broker (uid 1883 in the eclipse-mosquitto image) and streampipe (uid 10001, see
# Dockerfile). It runs as root for that, once, and exits.
set -eu
DIR=/secure
if [ ! -f "$DIR/passwd" ]; then
    streampipe broker init-secure "$DIR" --host mosquitto --bind 0.0.0.0 --sensors 3 --stage edge-1 --stage edge-2 >/dev/null
fi
chmod 0755 "$DIR"
chown 1883:1883 "$DIR/passwd" "$DIR/server.key"
chown -R 10001:10001 "$DIR/passwords" "$DIR/client.key"
echo "broker accounts ready; their passwords: docker compose run --rm --entrypoint cat init /secure/credentials"
