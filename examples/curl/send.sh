#!/bin/sh
# Send one email through Postlane's HTTP API with curl, then follow it until it is sent.
#
#   POSTLANE_API_URL=http://127.0.0.1:8000 POSTLANE_API_KEY=pl_... sh examples/curl/send.sh
#
# Optional: KEY (the idempotency key; default a new one), FROM, TO. Running it twice with
# the same KEY sends once: the second POST answers the same, "Idempotent-Replayed: true".
# The test suite runs this script against a live `postlane api` (tests/test_api.py).
set -eu

: "${POSTLANE_API_URL:?set POSTLANE_API_URL, e.g. http://127.0.0.1:8000}"
: "${POSTLANE_API_KEY:?set POSTLANE_API_KEY (postlane api-key create --senders ...)}"
KEY="${KEY:-curl-$(date +%s)-$$}"
FROM="${FROM:-agent@acme.test}"
TO="${TO:-bob@example.test}"

# POST /v1/emails: the Idempotency-Key header is the email's key. --fail-with-body prints
# the problem+json document (it names the field) and exits non-zero on an error.
curl --silent --show-error --fail-with-body \
  -H "Authorization: Bearer $POSTLANE_API_KEY" \
  -H "Idempotency-Key: $KEY" \
  -H "Content-Type: application/json" \
  --data "{\"sender\": \"$FROM\", \"to\": [\"$TO\"], \"subject\": \"Hello from curl\",
           \"text\": \"Sent with curl through Postlane's HTTP API.\"}" \
  "$POSTLANE_API_URL/v1/emails"
echo

# GET /v1/emails/{key} until the SMTP server accepted it (or it failed for good).
tries=0
while :; do
  report=$(curl --silent --show-error --fail-with-body \
    -H "Authorization: Bearer $POSTLANE_API_KEY" "$POSTLANE_API_URL/v1/emails/$KEY")
  case "$report" in
    *'"status":"sent"'*) echo "$report"; exit 0 ;;
    *'"status":"failed"'*|*'"status":"dead_letter"'*|*'"status":"cancelled"'*)
      echo "$report" >&2; exit 1 ;;
  esac
  tries=$((tries + 1))
  if [ "$tries" -ge 120 ]; then echo "still not sent: $report" >&2; exit 1; fi
  sleep 0.5
done
