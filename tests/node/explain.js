// Explain with nothing but onnxruntime-node: run a model exported by `onnxcam export` and write its outputs.
//   node explain.js MODEL.onnx INPUT.f32 N,C,H,W OUT_DIR [TARGETS.i64 N,S]
// INPUT.f32 holds the preprocessed batch as raw little-endian float32; each output is written to OUT_DIR as
// <name>.bin (raw, in its own type) and the shapes and types to OUT_DIR/outputs.json.
'use strict';
const fs = require('fs');
const path = require('path');
const ort = require('onnxruntime-node');

function dims(text) {
  return text.split(',').map(Number);
}

function tensorFrom(file, type, shape) {
  const bytes = fs.readFileSync(file);
  const Array = type === 'int64' ? BigInt64Array : Float32Array;
  const data = new Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / Array.BYTES_PER_ELEMENT);
  return new ort.Tensor(type, data, shape);
}

async function main() {
  const [modelPath, inputPath, inputShape, outDir, targetsPath, targetsShape] = process.argv.slice(2);
  const session = await ort.InferenceSession.create(modelPath, { logSeverityLevel: 3 });
  const feeds = { [session.inputNames[0]]: tensorFrom(inputPath, 'float32', dims(inputShape)) };
  if (targetsPath) {
    feeds.cam_target = tensorFrom(targetsPath, 'int64', dims(targetsShape)); // -1: the class ranked there
  }
  const results = await session.run(feeds);
  const described = {};
  for (const [name, tensor] of Object.entries(results)) {
    const file = name.replace(/[^A-Za-z0-9_.-]/g, '_') + '.bin';
    fs.writeFileSync(path.join(outDir, file), Buffer.from(tensor.data.buffer, tensor.data.byteOffset,
      tensor.data.byteLength));
    described[name] = { file, type: tensor.type, dims: tensor.dims };
  }
  fs.writeFileSync(path.join(outDir, 'outputs.json'), JSON.stringify(described));
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(1);
});
