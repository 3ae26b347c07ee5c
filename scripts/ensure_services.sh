#!/usr/bin/env bash
# Make sure the services the tests talk to are up on their standard localhost ports,
# starting any that stopped. Tests never skip for a missing broker: CI brings it up here.
set -euo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local name=$1 port=$2 tries=${3:-60}
  for _ in $(seq "$tries"); do
    port_open "$port" && return 0
    sleep 1
  done
  echo "ensure_services: $name did not open 127.0.0.1:$port" >&2
  return 1
}

if ! port_open 5432; then
  echo "ensure_services: starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql)" main start
fi
if ! port_open 6379; then
  echo "ensure_services: starting Redis"
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
if ! port_open 5672; then
  echo "ensure_services: starting RabbitMQ"
  rabbitmq-server -detached
fi
wait_port PostgreSQL 5432
wait_port Redis 6379
wait_port RabbitMQ 5672 120
# The port opens before the broker accepts AMQP logins; wait until it really answers.
for _ in $(seq 60); do
  if rabbitmqctl -q await_startup >/dev/null 2>&1; then break; fi
  sleep 1
done
echo "ensure_services: PostgreSQL, Redis and RabbitMQ are up"
