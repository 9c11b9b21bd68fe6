// A queue worker in Node, built from proto/ alone: batched receive, range acks,
// a refused foreign lease, a nack, a redelivery and a dead letter.
'use strict';
const test = require('node:test');
const assert = require('node:assert');
const { grpc, v1, RecordSetType, address, creds, call } = require('./proto');

// Ask `probe` until it answers something truthy, at most 50 times and 10 s; its last answer.
async function poll(probe) {
  let value;
  for (let i = 0, end = Date.now() + 10000; i < 50 && Date.now() < end && !value; i++) {
    if (i) await new Promise((resolve) => setTimeout(resolve, 100));
    value = await probe();
  }
  return value;
}
const batchOf = (values) => ({
  compression: 'COMPRESSION_NONE',
  records: RecordSetType.encode({ records: values.map((v) => ({ value: Buffer.from(v) })) }).finish(),
});
const size = (r) => Number(r.last_offset) - Number(r.first_offset) + 1;

test('receive batched, settle ranges, nack and dead-letter from Node', async () => {
  const topics = new v1.TopicService(address, creds);
  const log = new v1.LogService(address, creds);
  const queues = new v1.QueueService(address, creds);
  const topic = 'node-queue-' + process.pid;
  const group = 'node-q';
  await call(topics, 'CreateTopic', { topic, partition_count: 2 });
  await call(queues, 'CreateQueueGroup', { group, topic, config: {
    max_deliveries: 2, retry: { initial_delay_ms: 0, jitter: 'JITTER_NONE' } } });

  // 10 records per partition; partition 1, offset 4 is the poison one.
  const values = [0, 1].map((p) => Array.from({ length: 10 }, (_, i) => `job-${p}-${i}`));
  values[1][4] = 'poison';
  await call(log, 'Produce', { topic, partitions: values.map((v, partition) => ({ partition, batches: [batchOf(v)] })) });

  // Batched receive: stored batches plus leased ranges; only offsets in a range are ours.
  const ranges = [];
  const mine = new Map();  // "partition:offset" -> value
  await poll(async () => {
    const got = await call(queues, 'Receive', { group, topic, max_records: 100, max_wait_ms: 1000, batched: true });
    for (const { partition, batches, leased } of got.partitions) {
      ranges.push(...leased.map((r) => ({ partition, ...r })));
      for (const batch of batches) {
        RecordSetType.decode(batch.records).records.forEach((record, i) => {
          const offset = Number(batch.base_offset) + i;
          const ours = leased.some((r) => offset >= Number(r.first_offset) && offset <= Number(r.last_offset));
          if (ours) mine.set(`${partition}:${offset}`, record.value.toString());
        });
      }
    }
    return mine.size === 20;
  });
  assert.strictEqual(mine.size, 20);
  assert.strictEqual(mine.get('1:4'), 'poison');
  assert.ok(ranges.every((r) => r.delivery_count === 1 && Number(r.lease_expires_ms) > Date.now()));

  // A lease id that does not hold the offsets is refused, and changes nothing.
  const ack = (r, first_offset, last_offset, lease_id = r.lease_id) => ({
    partition: r.partition, first_offset, last_offset, lease_id, action: 'SETTLE_ACTION_ACK' });
  const [first] = ranges;
  const foreign = ack(first, first.first_offset, first.last_offset, String(BigInt(first.lease_id) ^ 1n));
  const [refused] = (await call(queues, 'Settle', { group, topic, ranges: [foreign] })).results;
  assert.deepStrictEqual([Number(refused.settled), Number(refused.refused), refused.error.reason],
    [0, size(first), 'LEASE_EXPIRED']);

  // Ack everything but the poison record: its range is split around it.
  const poison = ranges.find((r) => r.partition === 1 && Number(r.first_offset) <= 4 && Number(r.last_offset) >= 4);
  const acks = ranges.flatMap((r) => (r === poison ? [ack(r, r.first_offset, 3), ack(r, 5, r.last_offset)]
    : [ack(r, r.first_offset, r.last_offset)])).filter((a) => size(a) > 0);
  const settled = await call(queues, 'Settle', { group, topic, ranges: acks });
  assert.deepStrictEqual(settled.results.map((r) => [r.error, Number(r.settled), Number(r.refused)]),
    acks.map((a) => [null, size(a), 0]));

  // Nack the poison record (per-record form), receive it again, nack it past max_deliveries.
  const nacked = await call(queues, 'Settle', { group, topic, settlements: [{
    lease: { partition: 1, offset: 4, lease_id: poison.lease_id }, action: 'SETTLE_ACTION_NACK', reason: 'bad' }] });
  assert.strictEqual(nacked.results[0].error, null);
  const again = await call(queues, 'Receive', { group, topic, max_records: 10, max_wait_ms: 5000 });
  assert.deepStrictEqual(again.records.map((r) => [r.partition, r.offset, r.delivery_count, r.record.value.toString()]),
    [[1, '4', 2, 'poison']]);
  await call(queues, 'Nack', { group, topic, reason: 'still bad',
    lease: { partition: 1, offset: 4, lease_id: again.records[0].lease_id } });

  // Dead-lettering is asynchronous: read <topic>.dlq until the letter is there.
  const letter = await poll(async () => {
    for (const partition of [0, 1]) {
      const fetched = await call(log, 'Fetch', { topic: topic + '.dlq', partition, offset: 0 })
        .catch((err) => { if (err.code !== grpc.status.NOT_FOUND) throw err; });
      if (fetched && fetched.batches.length) return RecordSetType.decode(fetched.batches[0].records).records[0];
    }
  });
  assert.ok(letter, 'no dead letter in ' + topic + '.dlq');
  const headers = Object.fromEntries(letter.headers.map((h) => [h.key, h.value.toString()]));
  assert.strictEqual(letter.value.toString(), 'poison');
  assert.deepStrictEqual([headers['streamd-dlq-offset'], headers['streamd-dlq-deliveries'],
    headers['streamd-dlq-reason']], ['4', '2', 'still bad']);

  // All settled: 19 acked, 1 dead-lettered, nothing left before the log end.
  const stats = await poll(async () => {
    const { partitions } = (await call(queues, 'DescribeQueueGroup', { group, topic })).group;
    const done = (p) => p.start_offset === p.log_end_offset && Number(p.acked) + Number(p.dead_lettered) === 10;
    return partitions.every(done) && partitions;
  });
  assert.ok(stats, 'the queue group never settled everything');
  assert.strictEqual(stats.reduce((n, p) => n + Number(p.acked), 0), 19);
  assert.strictEqual(stats.reduce((n, p) => n + Number(p.dead_lettered), 0), 1);

  await call(queues, 'DeleteQueueGroup', { group, topic });
  for (const name of [topic, topic + '.dlq']) await call(topics, 'DeleteTopic', { topic: name });
  topics.close();
  log.close();
  queues.close();
});
