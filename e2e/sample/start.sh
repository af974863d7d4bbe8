#!/bin/sh
# Reads the "hot" files, then reports ready and idles.
set -e
for f in /data/shard-01.bin /data/shard-02.bin /data/shard-03.bin; do
  cat "$f" > /dev/null
done
echo "sample: ready"
touch /tmp/ready
exec sleep infinity
