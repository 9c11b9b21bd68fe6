// A consumer-group member in Node, built from proto/ alone: join, get partitions,
// give some up on revocation, commit, read offsets and lag, leave.
'use strict';
const test = require('node:test');
const assert = require('node:assert');
const { grpc, v1, address, creds, call } = require('./proto');

// One member: a JoinGroup stream and a queue of the assignments it receives.
function join(groups, group, topic) {
  const stream = groups.JoinGroup();
  const waiting = [];
  const received = [];
  stream.on('data', (msg) => {
    const next = waiting.shift();
    if (next) next(msg.assignment); else received.push(msg.assignment);
  });
  stream.on('error', () => {});
  stream.write({ join: { group, topics: [topic], client_id: 'node' } });
  return {
    stream,
    next: () => new Promise((resolve, reject) => {
      if (received.length) return resolve(received.shift());
      const timer = setTimeout(() => reject(new Error('no assignment')), 10000);
      waiting.push((a) => { clearTimeout(timer); resolve(a); });
    }),
    ack: (generation) => stream.write({ heartbeat: { generation } }),
    leave: () => { stream.write({ leave: {} }); stream.end(); },
  };
}
const owned = (a) => a.partitions.flatMap((tp) => tp.partitions);

test('join, rebalance, commit and describe from Node', async () => {
  const topics = new v1.TopicService(address, creds);
  const groups = new v1.GroupService(address, creds);
  const topic = 'node-group-' + process.pid;
  await call(topics, 'CreateTopic', { topic, partition_count: 2 });

  const a = join(groups, 'node-g', topic);
  const first = await a.next();
  assert.deepStrictEqual(owned(first).sort(), [0, 1]);

  const b = join(groups, 'node-g', topic);
  const revoked = await a.next();              // a gives one partition up ...
  assert.strictEqual(owned(revoked).length, 1);
  assert.deepStrictEqual(owned(await b.next()), []);  // ... before b may have it
  a.ack(revoked.generation);
  const given = await b.next();
  assert.strictEqual(owned(given).length, 1);
  assert.notStrictEqual(owned(given)[0], owned(revoked)[0]);

  await call(groups, 'CommitOffsets', {
    group: 'node-g', member_id: given.member_id, generation: given.generation,
    offsets: [{ topic, partition: owned(given)[0], offset: 0, metadata: 'from node' }],
  });
  // A stale generation is refused with ABORTED.
  await assert.rejects(call(groups, 'CommitOffsets', {
    group: 'node-g', member_id: first.member_id, generation: first.generation,
    offsets: [{ topic, partition: owned(given)[0], offset: 0 }],
  }), (err) => err.code === grpc.status.ABORTED);

  const fetched = await call(groups, 'FetchOffsets', { group: 'node-g' });
  assert.strictEqual(fetched.offsets[0].metadata, 'from node');
  const described = await call(groups, 'DescribeGroup', { group: 'node-g' });
  assert.strictEqual(described.group.members.length, 2);
  assert.strictEqual(described.group.state, 'GROUP_STATE_STABLE');

  b.leave();
  a.leave();
  await call(topics, 'DeleteTopic', { topic });
  topics.close();
  groups.close();
});
