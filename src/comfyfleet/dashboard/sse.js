// Server-Sent Events read with fetch(): EventSource cannot send an Authorization header.
// Used by live.js (the dashboard's stream, shared by the tabs), and by a page where the
// browser has no SharedWorker.

export class StreamRefused extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Resolves when the stream ends; `onEvent(name, data)` gets each event's parsed JSON.
async function read(url, headers, onEvent, signal) {
  const response = await fetch(url, { headers: { ...headers, Accept: "text/event-stream" }, signal });
  if (!response.ok) throw new StreamRefused(response.status, response.statusText);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    const lines = buffer.split(/\r\n|\r|\n/);
    buffer = lines.pop();
    for (const line of lines) {
      if (line === "") {
        if (data.length) onEvent(name, JSON.parse(data.join("\n")));
        name = "message";
        data = [];
      } else if (line.startsWith("event:")) {
        name = line.slice(6).trim();
      } else if (line.startsWith("data:")) {
        data.push(line.slice(5).replace(/^ /, ""));
      }
    }
  }
}

// Follow a stream, reconnecting with backoff until `signal` aborts or the service refuses it
// (`onRefused(status)`, for a 4xx: the key is wrong, or the job gone). `onState(true|false)`
// says whether it is connected.
export async function follow(url, headers, onEvent, signal, onState = () => {}, onRefused = () => {}) {
  let delay = 500;
  while (!signal.aborted) {
    try {
      onState(true);
      await read(url, headers, onEvent, signal);
      delay = 500;
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof StreamRefused && error.status < 500) {
        onState(false);
        onRefused(error.status);
        return;
      }
    }
    onState(false);
    if (signal.aborted) return;
    await new Promise((resolve) => setTimeout(resolve, delay));
    delay = Math.min(delay * 2, 10000);
  }
}
