#!/usr/bin/env bash
# 20 launch/demo.sh runs and 10 runs on 4 namespace nodes (root): how the pre-training
# probe fitted each time (its method, its traffic, its beta). Results: docs/netmodel.md.
cd "$(dirname "$0")/.."
for i in $(seq 1 20); do
  launch/demo.sh --metrics-linger 0 --progress none > /tmp/pl-demo.out 2> /tmp/pl-demo.err
  rc=$?
  python3 -c "
import json,sys
s=json.load(open('runs/demo/summary.json')); p=s['probe']
print('demo', $i, 'rc', $rc, p['method'], 'wire', p['wire_bytes'], 'beta MB/s %.0f' % (s['prediction']['beta_bytes_per_second']/1e6), 'couldnotfit', 'could not fit' in open('/tmp/pl-demo.err').read())"
done
for i in $(seq 1 10); do
  rm -rf /tmp/pl4
  launch/netns-cluster.sh --nodes 4 --out /tmp/pl4 -- --max-steps 30 --progress none --layers 256,512,512,10 > /dev/null 2>&1
  rc=$?
  python3 -c "
import json
s=json.load(open('/tmp/pl4/node0/summary.json')); p=s['probe']
print('netns4', $i, 'rc', $rc, p['method'], 'wire', p['wire_bytes'], 'beta MB/s %.0f' % (s['prediction']['beta_bytes_per_second']/1e6))"
done
