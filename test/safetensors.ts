// Just enough of the safetensors format (8-byte little-endian header length, JSON header, raw data) for tests to
// read and perturb the f32 tensors that the engines write (and the f64 step count of the optimizer's).
import { readFileSync, writeFileSync } from 'node:fs';

export type Tensors = Map<string, { shape: number[]; data: Float32Array }>;

export function readTensors(path: string): Tensors {
  const bytes = readFileSync(path);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<
    string,
    { dtype: string; shape: number[]; data_offsets: [number, number] }
  >;
  const tensors: Tensors = new Map();
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (info.dtype !== 'F32' && info.dtype !== 'F64') throw new Error(`${name} is ${info.dtype}, not F32 or F64`);
    const [begin, end] = info.data_offsets;
    const raw = bytes.subarray(8 + headerLength + begin, 8 + headerLength + end);
    const copy = raw.buffer.slice(raw.byteOffset, raw.byteOffset + raw.length);
    // F64 holds only the optimizer's step count, which f32 represents exactly.
    const data = info.dtype === 'F32' ? new Float32Array(copy) : Float32Array.from(new Float64Array(copy));
    tensors.set(name, { shape: info.shape, data });
  }
  return tensors;
}

export function writeTensors(path: string, tensors: Tensors): void {
  const header: Record<string, unknown> = {};
  let offset = 0;
  for (const [name, { shape, data }] of tensors) {
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + data.byteLength] };
    offset += data.byteLength;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const out = Buffer.alloc(8 + json.length + offset);
  out.writeBigUInt64LE(BigInt(json.length), 0);
  out.write(json, 8, 'utf8');
  let at = 8 + json.length;
  for (const { data } of tensors.values()) {
    out.set(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), at);
    at += data.byteLength;
  }
  writeFileSync(path, out);
}
