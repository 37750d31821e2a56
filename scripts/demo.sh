#!/usr/bin/env bash
# The main job through the whole service, on this machine: `make demo` runs this after `make setup`.
#
#   you (CLI, browser) ── API server (token) ── redis-server (AOF) ── dispatcher ── Ray head (2 CPUs)
#   ── Ray Job: 2 Ray Train workers x 2 towers ── Fashion-MNIST shards (local folder, or a local S3 server
#   with S3=1) ── checkpoints ── result in Redis, read back through the API
#
# Knobs (environment): EPOCHS, SEED (default: the job's), S3=1, DEMO_DIR (default demo/), and the ports
# REDIS_PORT, RAY_PORT, DASHBOARD_PORT, S3_PORT, API_PORT. Everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_DIR=$(realpath -m "${DEMO_DIR:-demo}")
STACK=$(realpath -m "${STACK:-.stack}")
REDIS_PORT=${REDIS_PORT:-6390}
RAY_PORT=${RAY_PORT:-6391}          # Ray's GCS; outside Ray's worker port range (10002-19999)
CLIENT_PORT=${CLIENT_PORT:-6392}
AGENT_PORT=${AGENT_PORT:-6393}
DASHBOARD_PORT=${DASHBOARD_PORT:-8266}
S3_PORT=${S3_PORT:-6394}
API_PORT=${API_PORT:-8267}
S3=${S3:-0}
EPOCHS=${EPOCHS:-}
SEED=${SEED:-}
JOB_SPEC=${JOB_SPEC:-jobs/fashion-mnist.toml}

rm -rf "$STACK/redis"  # a fresh queue each demo: no half-finished job from an interrupted one
mkdir -p "$STACK/redis" "$STACK/logs" "$DEMO_DIR"
export ALEXNET_DIST_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
export ALEXNET_DIST_RAY_DASHBOARD="http://127.0.0.1:$DASHBOARD_PORT"
export ALEXNET_DIST_STORAGE="$STACK/storage"
export RAY_ADDRESS="127.0.0.1:$RAY_PORT"
export PYTHONUNBUFFERED=1

pids=()
ray_pgid=""
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null; done
  [ -n "$ray_pgid" ] && kill -TERM -- "-$ray_pgid" 2>/dev/null
  sleep 1
  [ -n "$ray_pgid" ] && kill -KILL -- "-$ray_pgid" 2>/dev/null
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  echo "demo: stopped redis-server, the Ray head, the API server and the dispatcher"
}
trap cleanup EXIT

wait_port() {  # wait_port PORT WHAT
  for _ in $(seq 1 150); do
    (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0
    sleep 0.2
  done
  echo "demo: $2 did not open port $1; see $STACK/logs" >&2
  exit 1
}

for port in $REDIS_PORT $RAY_PORT $DASHBOARD_PORT $API_PORT; do
  if (echo >/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then
    echo "demo: port $port is taken (an earlier demo still running?); set REDIS_PORT/RAY_PORT/DASHBOARD_PORT/API_PORT" >&2
    exit 1
  fi
done

echo "== 1. local stack: redis-server :$REDIS_PORT, Ray head :$RAY_PORT (dashboard :$DASHBOARD_PORT)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$STACK/redis" --appendonly yes --save "" \
  >"$STACK/logs/redis.log" 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT" redis-server

if [ "$S3" = 1 ]; then
  export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
  export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
  moto_server -H 127.0.0.1 -p "$S3_PORT" >"$STACK/logs/s3.log" 2>&1 &
  pids+=($!)
  wait_port "$S3_PORT" "the S3 server"
  python -c "import boto3; boto3.client('s3').create_bucket(Bucket='alexnet-demo')"
  SHARDS="s3://alexnet-demo/shards/fashion-mnist"
  export ALEXNET_DIST_STORAGE="s3://alexnet-demo/runs"
  echo "   S3 server on :$S3_PORT, bucket s3://alexnet-demo"
else
  SHARDS=${SHARDS:-"$PWD/shards/fashion-mnist"}
fi

setsid ray start --head --block --num-cpus=2 --disable-usage-stats --include-dashboard=true \
  --dashboard-host=127.0.0.1 --port="$RAY_PORT" --dashboard-port="$DASHBOARD_PORT" \
  --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
  >"$STACK/logs/ray-head.log" 2>&1 &
ray_pgid=$!
wait_port "$DASHBOARD_PORT" "the Ray dashboard"

echo "== 2. Fashion-MNIST shards from /usr/share/datasets/fashion-mnist -> $SHARDS"
manifest_dir="$STACK/manifests"
if [ "$S3" = 1 ] || [ ! -e "$SHARDS/fashion-mnist-test.json" ]; then
  alexnet-dist shards build /usr/share/datasets/fashion-mnist "$SHARDS" --format fashion-mnist \
    --resize-to 36 --shard-size 2000 --processes 2 --manifest-dir "$manifest_dir"
else
  echo "   already built"
fi
TRAIN_MANIFEST="$SHARDS/fashion-mnist-train.json"
VAL_MANIFEST="$SHARDS/fashion-mnist-test.json"

echo "== 3. the API server :$API_PORT and a user: the commands below go through it with a token"
# The operator's side (Redis): one user, whose token is printed once and kept only as a hash.
TOKEN=$(alexnet-dist admin user add demo --team demo --replace --token-only)
(umask 077 && echo "$TOKEN" >"$STACK/demo-token")
alexnet-dist server --port "$API_PORT" >"$STACK/logs/api-server.log" 2>&1 &
pids+=($!)
wait_port "$API_PORT" "the API server"
export ALEXNET_DIST_SERVER="http://127.0.0.1:$API_PORT" ALEXNET_DIST_TOKEN="$TOKEN"
echo "   dashboard: $ALEXNET_DIST_SERVER (log in with the token in $STACK/demo-token)"

echo "== 4. submit $JOB_SPEC"
sets=(--set "data.train=$TRAIN_MANIFEST" --set "data.val=$VAL_MANIFEST")
[ -n "$EPOCHS" ] && sets+=(--set "train.epochs=$EPOCHS")
[ -n "$SEED" ] && sets+=(--set "seed=$SEED")
JOB=$(alexnet-dist submit "$JOB_SPEC" "${sets[@]}" --json | python -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "   job $JOB queued"

echo "== 5. dispatcher (launches the job as a Ray Job), live progress"
alexnet-dist dispatcher --interval 0.5 >"$STACK/logs/dispatcher.log" 2>&1 &
pids+=($!)
started=$(date +%s)
alexnet-dist watch "$JOB"
elapsed=$(( $(date +%s) - started ))

echo "== 6. result (through the API server)"
alexnet-dist status "$JOB"
alexnet-dist result "$JOB"
alexnet-dist result "$JOB" --json >"$DEMO_DIR/result.json"
python - "$DEMO_DIR/result.json" "$elapsed" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
res = r.get("result", r)
print(f"   top-1 error {res['top1_error']:.4f} (accuracy {1 - res['top1_error']:.2%}), "
      f"top-5 error {res['top5_error']:.4f}, ten-crop={res['ten_crop']}, on {res['val_samples']} test images")
print(f"   training {res['train_seconds']:.0f} s; submit to result {sys.argv[2]} s; "
      f"{res['images_per_s']:.0f} images/s in the last epoch")
print(f"   model: {res['model_url']}\n   checkpoints: {res['checkpoint_url']}")
EOF

echo "== 7. classify test images written out as ordinary files"
python - "$DEMO_DIR/images" <<'EOF'
import sys
from pathlib import Path
from PIL import Image
from alexnet_dist.data.build.fashion_mnist import CLASSES, load_split
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
images, labels = load_split("/usr/share/datasets/fashion-mnist", "test")
for i in range(8):
    name = CLASSES[labels[i]].replace("/", "-").replace(" ", "-").lower()
    Image.fromarray(images[i]).save(out / f"test{i:02d}-{name}.{'png' if i % 2 else 'jpg'}")
EOF
alexnet-dist classify "$JOB" "$DEMO_DIR"/images/*

echo "== 8. learning curves"
alexnet-dist plot "$JOB" -o "$DEMO_DIR/curves.png"
echo "   wrote $DEMO_DIR/curves.png"
