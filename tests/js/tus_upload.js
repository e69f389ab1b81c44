// tus-js-client under Node, driven by tests/test_tus_js.py.
// node tus_upload.js ENDPOINT FILE MODE [UPLOAD_URL]
//   MODE create: creation-with-upload, 1 MiB chunks, to the end
//   MODE half:   1 MiB chunks, aborted once half the file is in
//   MODE resume: from UPLOAD_URL (HEAD, then PATCH from its offset) to the end
// Prints one JSON line: {"url", "offset", "jobLocation"}.
"use strict";
const fs = require("fs");
const tus = require("tus-js-client");

const [endpoint, file, mode, uploadUrl] = process.argv.slice(2);
const data = fs.readFileSync(file);
let upload;

function done(offset, response) {
  const jobLocation = response ? response.getHeader("Job-Location") || null : null;
  process.stdout.write(JSON.stringify({ url: upload.url, offset, jobLocation }) + "\n");
}

upload = new tus.Upload(data, {
  endpoint,
  uploadUrl: mode === "resume" ? uploadUrl : null,
  chunkSize: 1 << 20,
  uploadDataDuringCreation: mode === "create",
  retryDelays: null,
  metadata: { profile: "mp4-h264", filename: "movie.flv" },
  onError(error) {
    process.stderr.write(String(error) + "\n");
    process.exit(1);
  },
  onChunkComplete(chunkSize, bytesAccepted, bytesTotal) {
    if (mode === "half" && bytesAccepted >= bytesTotal / 2) {
      upload.abort().then(() => done(bytesAccepted, null));
    }
  },
  onSuccess(payload) {
    done(data.length, payload && payload.lastResponse);
  },
});
upload.start();
