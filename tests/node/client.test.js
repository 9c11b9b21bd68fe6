// A Node.js client built from proto/ alone: create a topic, produce, fetch,
// subscribe. Run by tests/integration/test_node_client.py with STREAMD_SERVER set.
'use strict';
const test = require('node:test');
const assert = require('node:assert');
const zlib = require('node:zlib');
const { grpc, v1, RecordSetType, address, creds, call } = require('./proto');

const topics = new v1.TopicService(address, creds);
const log = new v1.LogService(address, creds);
const topic = 'node-' + process.pid;

function partitionFor(key, count) { // the documented partitioner
  return zlib.crc32(Buffer.from(key)) % count;
}

test('create, produce, fetch, subscribe from Node', async () => {
  const created = await call(topics, 'CreateTopic', { topic, partition_count: 2 });
  assert.strictEqual(created.topic.partition_count, 2);

  // Pre-batched: the producer encodes a RecordSet and sends it as a batch.
  const key = Buffer.from('customer-42');
  const partition = partitionFor(key, 2);
  const payload = RecordSetType.encode(RecordSetType.create({
    records: [{ key, value: Buffer.from('first') }, { key, value: Buffer.from('second') }],
  })).finish();
  const produced = await call(log, 'Produce', {
    topic, partitions: [{ partition, batches: [{ compression: 'COMPRESSION_NONE', records: payload }] }],
  });
  assert.strictEqual(produced.results[0].base_offset, '0');
  assert.strictEqual(produced.results[0].durable, true);

  // Broker-routed: the broker applies the same partitioner.
  const routed = await call(log, 'Produce', { topic, records: [{ key, value: Buffer.from('third') }] });
  assert.strictEqual(routed.results[0].partition, partition);

  const fetched = await call(log, 'Fetch', { topic, partition, offset: 0 });
  assert.strictEqual(fetched.log_end_offset, '3');
  const values = [];
  for (const batch of fetched.batches) {
    assert.ok(batch.crc32 > 0);
    const set = RecordSetType.decode(batch.records);
    set.records.forEach((r, i) => values.push([Number(batch.base_offset) + i, r.value.toString()]));
  }
  assert.deepStrictEqual(values, [[0, 'first'], [1, 'second'], [2, 'third']]);

  // Subscribe from the beginning and read until all three records arrived.
  const stream = log.Subscribe({ topic, partition, position: 'OFFSET_SPEC_EARLIEST' });
  const seen = await new Promise((resolve, reject) => {
    const got = [];
    const timer = setTimeout(() => reject(new Error('subscribe timed out')), 10000);
    stream.on('data', (msg) => {
      for (const batch of msg.batches) {
        for (const r of RecordSetType.decode(batch.records).records) got.push(r.value.toString());
      }
      if (got.length >= 3) { clearTimeout(timer); resolve(got); }
    });
    stream.on('error', (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
  stream.cancel();
  assert.deepStrictEqual(seen, ['first', 'second', 'third']);

  // Errors carry a status code Node understands.
  await assert.rejects(call(log, 'Fetch', { topic: 'no-such-topic', partition: 0, offset: 0 }),
    (err) => err.code === grpc.status.NOT_FOUND);
  await call(topics, 'DeleteTopic', { topic });
  topics.close();
  log.close();
});
