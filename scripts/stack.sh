#!/usr/bin/env bash
# The local stack: a real single-node Apache Kafka broker (KRaft, from Maven Central) and
# Redis (Debian's redis-server), both bound to 127.0.0.1.
#   scripts/stack.sh setup   fetch/install what is missing (idempotent; Prometheus too)
#   scripts/stack.sh setup-prometheus   only Debian's prometheus (the dashboard and alert tests)
#   scripts/stack.sh up      setup, then start both (idempotent) and wait until they answer
#   scripts/stack.sh down    stop what `up` started
#   scripts/stack.sh status
#   scripts/stack.sh kafka-stop|kafka-start|redis-stop|redis-start   (fault tests)
# Environment: STACK_DIR (state, default .stack), KAFKA_PORT, KAFKA_CONTROLLER_PORT, REDIS_PORT,
# KAFKA_LIBS (the broker's jars, default $STACK_DIR/kafka/libs), KAFKA_HEAP (max heap, 1g).
# SASL mode (tests of secure connections): with KAFKA_SASL_USER and KAFKA_SASL_PASSWORD set,
# the broker's only client listener is SASL_PLAINTEXT with SCRAM-SHA-256, and that user is
# created when the storage is formatted (a fresh STACK_DIR is needed to change it).
# TLS mode: with KAFKA_SSL_KEYSTORE (PKCS12 with the broker's key and certificate),
# KAFKA_SSL_TRUSTSTORE (PKCS12 with the CA that signs client certificates) and
# KAFKA_SSL_PASSWORD (both stores' password), the client listener is SSL (SASL_SSL with SASL
# mode) and clients must present a certificate (KAFKA_SSL_CLIENT_AUTH: required, requested, none).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state=${STACK_DIR:-$root/.stack}
kafka_port=${KAFKA_PORT:-9092}
controller_port=${KAFKA_CONTROLLER_PORT:-9093}
redis_port=${REDIS_PORT:-6379}
libs=${KAFKA_LIBS:-$state/kafka/libs}
sasl_user=${KAFKA_SASL_USER:-}
sasl_password=${KAFKA_SASL_PASSWORD:-}
ssl_keystore=${KAFKA_SSL_KEYSTORE:-}
ssl_truststore=${KAFKA_SSL_TRUSTSTORE:-}
ssl_password=${KAFKA_SSL_PASSWORD:-}
ssl_client_auth=${KAFKA_SSL_CLIENT_AUTH:-required}
mkdir -p "$state"

log() { echo "[stack] $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # port seconds name
  local i
  for ((i = 0; i < $2 * 5; i++)); do
    if port_open "$1"; then return 0; fi
    sleep 0.2
  done
  log "$3 did not open port $1 within $2 s"; return 1
}

setup_kafka() {
  if [ -f "$libs/.complete" ]; then return; fi
  log "fetching Apache Kafka from Maven Central (cached in ~/.m2)"
  mvn -q -B -f "$root/scripts/kafka/pom.xml" dependency:copy-dependencies \
    -DoutputDirectory="$libs" -DincludeScope=runtime >&2
  touch "$libs/.complete"
}

setup_redis() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  log "installing redis-server from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >&2
}

# Only the binaries are used (the tests start Prometheus on 127.0.0.1 themselves); the package's
# service is not started (policy-rc.d in containers, and it is stopped below if it was).
setup_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then return; fi
  log "installing prometheus from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 prometheus >&2
}

# nginx is the benchmarks' fixed-answer upstream; the bench smoke tests in `make test` run it on
# 127.0.0.1 themselves (the package's own service is not used).
setup_nginx() {
  if [ -x /usr/sbin/nginx ]; then return; fi
  log "installing nginx-light from Debian's packages"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    -o DPkg::Lock::Timeout=600 nginx-light >&2
}

# The client listener: PLAINTEXT, SASL_PLAINTEXT + SCRAM-SHA-256 in SASL mode, SSL in TLS mode,
# SASL_SSL in both.
listener_name() {
  local name=PLAINTEXT
  if [ -n "$sasl_user" ] && [ -n "$ssl_keystore" ]; then name=SASL_SSL
  elif [ -n "$sasl_user" ]; then name=SASL_PLAINTEXT
  elif [ -n "$ssl_keystore" ]; then name=SSL; fi
  echo "$name"
}

listener_properties() {
  local name; name=$(listener_name)
  local lower; lower=$(echo "$name" | tr '[:upper:]' '[:lower:]')
  cat <<PROPS
listeners=$name://127.0.0.1:$kafka_port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=$name://127.0.0.1:$kafka_port
inter.broker.listener.name=$name
listener.security.protocol.map=CONTROLLER:PLAINTEXT,$name:$name
PROPS
  if [ -n "$sasl_user" ]; then
    cat <<PROPS
sasl.enabled.mechanisms=SCRAM-SHA-256
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-256
listener.name.$lower.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="$sasl_user" password="$sasl_password";
PROPS
  fi
  if [ -n "$ssl_keystore" ]; then
    cat <<PROPS
ssl.keystore.type=PKCS12
ssl.keystore.location=$ssl_keystore
ssl.keystore.password=$ssl_password
ssl.key.password=$ssl_password
ssl.truststore.type=PKCS12
ssl.truststore.location=$ssl_truststore
ssl.truststore.password=$ssl_password
ssl.client.auth=$ssl_client_auth
PROPS
  fi
}

kafka_start() {
  if port_open "$kafka_port"; then log "kafka already up on $kafka_port"; return; fi
  if [ -n "$sasl_user" ] && [ -z "$sasl_password" ]; then
    log "KAFKA_SASL_USER needs KAFKA_SASL_PASSWORD"; exit 2
  fi
  if [ -n "$ssl_keystore" ] && { [ -z "$ssl_truststore" ] || [ -z "$ssl_password" ]; }; then
    log "KAFKA_SSL_KEYSTORE needs KAFKA_SSL_TRUSTSTORE and KAFKA_SSL_PASSWORD"; exit 2
  fi
  setup_kafka
  local dir=$state/kafka
  mkdir -p "$dir/data"
  (umask 077; cat > "$dir/server.properties") <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
controller.listener.names=CONTROLLER
$(listener_properties)
log.dirs=$dir/data
num.partitions=4
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
delete.topic.enable=true
log.retention.hours=24
PROPS
  cat > "$dir/log4j.properties" <<PROPS
log4j.rootLogger=WARN, file
log4j.appender.file=org.apache.log4j.FileAppender
log4j.appender.file.File=$dir/server.log
log4j.appender.file.layout=org.apache.log4j.PatternLayout
log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n
PROPS
  local java=(java -Xms256m "-Xmx${KAFKA_HEAP:-1g}" -XX:+UseG1GC
    -Dlog4j.configuration="file:$dir/log4j.properties" -cp "$libs/*")
  if [ ! -f "$dir/data/meta.properties" ]; then
    local scram=()
    if [ -n "$sasl_user" ]; then
      scram=(--add-scram "SCRAM-SHA-256=[name=$sasl_user,password=$sasl_password]")
    fi
    "${java[@]}" kafka.tools.StorageTool format -t "$(cat /proc/sys/kernel/random/uuid | tr -d - | head -c 22)" \
      -c "$dir/server.properties" "${scram[@]}" >/dev/null
  fi
  log "starting kafka on 127.0.0.1:$kafka_port ($(listener_name)${sasl_user:+, SCRAM-SHA-256})"
  nohup "${java[@]}" kafka.Kafka "$dir/server.properties" >"$dir/stdout.log" 2>&1 &
  echo $! > "$dir/pid"
  wait_port "$kafka_port" 90 kafka || { tail -20 "$dir/stdout.log" "$dir/server.log" >&2; exit 1; }
}

kafka_stop() {
  local pidf=$state/kafka/pid
  [ -f "$pidf" ] || return 0
  local pid; pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping kafka ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$pidf"
}

redis_start() {
  if port_open "$redis_port"; then log "redis already up on $redis_port"; return; fi
  mkdir -p "$state/redis"
  log "starting redis on 127.0.0.1:$redis_port"
  redis-server --bind 127.0.0.1 --port "$redis_port" --daemonize yes --save '' --appendonly no \
    --dir "$state/redis" --pidfile "$state/redis/pid" --logfile "$state/redis/server.log"
  wait_port "$redis_port" 20 redis
}

redis_stop() {
  local pidf=$state/redis/pid
  if [ ! -f "$pidf" ]; then  # started elsewhere (another checkout): ask it to stop
    if port_open "$redis_port"; then
      log "stopping redis on $redis_port"
      redis-cli -h 127.0.0.1 -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
      for _ in $(seq 1 50); do port_open "$redis_port" || break; sleep 0.1; done
    fi
    return 0
  fi
  local pid; pid=$(cat "$pidf")
  if kill -0 "$pid" 2>/dev/null; then
    log "stopping redis ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidf"
}

case "${1:-}" in
  setup) setup_kafka; setup_redis; setup_prometheus; setup_nginx ;;
  setup-prometheus) setup_prometheus ;;
  up) setup_kafka; setup_redis; setup_prometheus; kafka_start; redis_start; log "stack is up" ;;
  down) kafka_stop; redis_stop; log "stack is down" ;;
  reset) kafka_stop; redis_stop; rm -rf "$state/kafka/data" "$state/redis" ;;
  kafka-start) kafka_start ;;
  kafka-stop) kafka_stop ;;
  redis-start) redis_start ;;
  redis-stop) redis_stop ;;
  status)
    port_open "$kafka_port" && echo "kafka: up ($kafka_port)" || echo "kafka: down"
    port_open "$redis_port" && echo "redis: up ($redis_port)" || echo "redis: down" ;;
  *) echo "usage: $0 setup|setup-prometheus|up|down|reset|status|kafka-start|kafka-stop|redis-start|redis-stop" >&2; exit 2 ;;
esac
