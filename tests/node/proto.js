// What every Node test here shares: the gRPC services and the RecordSet type, loaded
// from proto/ alone, and a promise-returning unary call with a 10 s deadline.
'use strict';
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_DIR = path.resolve(__dirname, '../../proto');
const def = protoLoader.loadSync('streamd/v1/streamd.proto', {
  includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: true, oneofs: true,
});
const v1 = grpc.loadPackageDefinition(def).streamd.v1;

// protobufjs types for the RecordSet payload of a batch (encode and decode).
const root = new protobuf.Root();
root.resolvePath = (_origin, target) => path.join(PROTO_DIR, target);
root.loadSync('streamd/v1/streamd.proto', { keepCase: true });
const RecordSetType = root.lookupType('streamd.v1.RecordSet');

const address = process.env.STREAMD_SERVER;
const creds = grpc.credentials.createInsecure();
const call = (client, method, request) => new Promise((resolve, reject) => {
  client[method](request, { deadline: Date.now() + 10000 }, (err, reply) => (err ? reject(err) : resolve(reply)));
});

module.exports = { grpc, v1, RecordSetType, address, creds, call };
