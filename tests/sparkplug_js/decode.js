// Decodes Sparkplug B payloads with Eclipse Tahu's sparkplug-payload, for tests/sparkplug.rs.
// stdin: one JSON object per line, {"topic": "...", "hex": "<payload as hex>"} to decode, or
// {"topic": "...", "encode": <payload as Tahu takes it>} to encode (a host's NCMD or DCMD).
// stdout: one JSON object per line, {"topic": "...", "payload": <decoded>}, {"topic", "hex"},
// or {"topic", "error"}.
// 64-bit values (Long) come out as decimal strings when they exceed 2^53, else as numbers.
"use strict";
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const readline = require("readline");

function plain(v) {
  if (v === null || v === undefined) return v === undefined ? null : v;
  if (typeof v === "object" && typeof v.toNumber === "function" && "low" in v && "high" in v) {
    const n = v.toNumber();
    return Number.isSafeInteger(n) ? n : v.toString();
  }
  if (Buffer.isBuffer(v) || v instanceof Uint8Array) return Buffer.from(v).toString("hex");
  if (Array.isArray(v)) return v.map(plain);
  if (typeof v === "object") {
    const out = {};
    for (const k of Object.keys(v)) out[k] = plain(v[k]);
    return out;
  }
  return v;
}

const rl = readline.createInterface({ input: process.stdin });
rl.on("line", (line) => {
  if (!line.trim()) return;
  const { topic, hex, encode } = JSON.parse(line);
  let out;
  try {
    if (encode !== undefined) {
      out = { topic, hex: Buffer.from(sparkplug.encodePayload(encode)).toString("hex") };
    } else {
      out = { topic, payload: plain(sparkplug.decodePayload(Buffer.from(hex, "hex"))) };
    }
  } catch (e) {
    out = { topic, error: String(e) };
  }
  process.stdout.write(JSON.stringify(out) + "\n");
});
