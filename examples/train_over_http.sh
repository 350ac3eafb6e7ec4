#!/usr/bin/env bash
# Train a sentiment prompt over HTTP on a running server (`make serve`), watch its progress,
# then generate with the new version. Prints how long the job took.
#
#   examples/train_over_http.sh                     # server on 127.0.0.1:8000
#   URL=http://127.0.0.1:9000 STEPS=50 examples/train_over_http.sh
set -euo pipefail
URL=${URL:-http://127.0.0.1:8000}
DATA=${DATA:-"$(dirname "$0")/data/sentiment.train.jsonl"}
STEPS=${STEPS:-150}
NAME=${NAME:-sentiment}
AUTH=()
if [ -n "${SOFTPROMPT_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $SOFTPROMPT_API_KEY"); fi

started=$(date +%s)
job=$(curl -sS --fail-with-body "${AUTH[@]}" "$URL/train" \
  -F "file=@$DATA" -F "name=$NAME" -F "steps=$STEPS" \
  -F "init=Classify the sentiment of this review as positive or negative.")
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$job")
echo "job $id queued"

# Progress (the same fields stream as Server-Sent Events from $URL/train/$id/events).
probed=
while :; do
  status=$(curl -sS "$URL/train/$id")
  line=$(python3 -c 'import json,sys; j=json.load(sys.stdin); r=lambda v, n=3: None if v is None else round(v, n); print(j["state"], "step %s/%s" % (j["step"], j["total"]), "loss", r(j["loss"]), "val", r(j["val_metric"]), "eta", r(j["eta_seconds"], 0))' <<<"$status")
  echo "$line"
  case "$line" in succeeded*|failed*|cancelled*) break ;; esac
  if [ -z "$probed" ] && [[ "$line" == running*step* ]] && [[ "$line" != *"step 0/"* ]]; then
    probed=1  # serving stays up while the job trains
    curl -sS -o /dev/null -w "generate during training: HTTP %{http_code} in %{time_total} s\n" \
      "$URL/generate" -H 'Content-Type: application/json' -d '{"input": "Hello!", "max_new_tokens": 8}'
  fi
  sleep 10
done
echo "job took $(( $(date +%s) - started )) s"
python3 -c 'import json,sys; j=json.load(sys.stdin); print("published", j["version"], "error", j["error"]); print(json.dumps(j["metrics"], indent=1)[:1500])' <<<"$status"

curl -sS "$URL/generate?prompt=$NAME" -H 'Content-Type: application/json' \
  -d '{"input": "A gorgeous, witty and moving film.", "max_new_tokens": 4}'
echo
curl -sS -o "/tmp/$NAME-curve.png" "$URL/train/$id/curve.png" && echo "curve saved to /tmp/$NAME-curve.png"
