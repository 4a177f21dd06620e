"use strict";
// cluster-page.js — the cluster-adapter checks of cluster-clients.js in a real headless
// Chromium, against cluster-page-app.js under stickyd (-key sid,header:X-Route).
//
//   node cluster-page.js --url http://127.0.0.1:PORT --workers N [--tabs 6]
//       [--route-header X-Route] [--timeout-ms 60000] [--chromium /usr/bin/chromium]
//
// Opens --tabs tabs of ONE browser (they share its keep-alive connection pool) on
// URL/cluster-page and waits until each is connected over WebSocket and knows its worker.
// The driver reaches every worker with plain HTTP by varying the route header, and from
// each worker: io.emit (every tab must receive it), fetchSockets (counts every tab), a
// broadcast with acks (every tab answers). Then tab 0 joins a room; from every other worker
// a room broadcast, followed by a plain broadcast from the same worker as a barrier: when
// every tab has the barrier, the member must have the room message and no other tab may.
// Prints ONE JSON line {tabs, connected, tabWorkers, workers:[{worker, pid, emitReceived,
// fetchCount, ackCount, ackError}], room:{worker, from, leaked, fetchCount}, errors,
// durationMs}; exit 0 only if nothing failed (the Go test judges the numbers).
// The browser is $CHROMIUM or --chromium, default /usr/bin/chromium.
const fs = require("fs");
const os = require("os");
const path = require("path");
const http = require("http");
const crypto = require("crypto");
const puppeteer = require("puppeteer-core");

const opt = { url: "", workers: 0, tabs: 6, routeHeader: "X-Route", timeoutMs: 60000, chromium: process.env.CHROMIUM || "/usr/bin/chromium" };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const v = process.argv[++i];
  if (v === undefined) usage(`missing value for ${a}`);
  switch (a) {
    case "--url": opt.url = v.replace(/\/+$/, ""); break;
    case "--workers": opt.workers = Number(v); break;
    case "--tabs": opt.tabs = Number(v); break;
    case "--route-header": opt.routeHeader = v; break;
    case "--timeout-ms": opt.timeoutMs = Number(v); break;
    case "--chromium": opt.chromium = v; break;
    default: usage(`unknown argument ${a}`);
  }
}
if (!opt.url || !(opt.workers >= 1) || !(opt.tabs >= 1 && opt.tabs <= 32) || !(opt.timeoutMs > 0)) {
  usage("--url, --workers >= 1, --tabs 1..32 and a positive --timeout-ms are required");
}
function usage(msg) {
  process.stderr.write(`cluster-page.js: ${msg}\n`);
  process.stderr.write("usage: node cluster-page.js --url URL --workers N [--tabs 6] [--route-header H] [--timeout-ms N] [--chromium PATH]\n");
  process.exit(2);
}

const started = Date.now();
const deadline = started + opt.timeoutMs;
const remaining = () => Math.max(1, deadline - Date.now());
const out = { tabs: opt.tabs, connected: 0, tabWorkers: [], workers: [], room: { worker: null, from: [], leaked: 0, fetchCount: null }, errors: [] };
class Failed extends Error {}
function fail(msg) {
  throw new Failed(msg);
}

// get: GET path routed by the route header; resolves the JSON answer.
function get(p, route) {
  return new Promise((resolve, reject) => {
    const req = http.get(opt.url + p, { agent: false, timeout: remaining(), headers: { [opt.routeHeader]: String(route) } }, (res) => {
      let data = "";
      res.setEncoding("utf8");
      res.on("data", (d) => (data += d));
      res.on("end", () => {
        try {
          resolve(JSON.parse(data));
        } catch (_) {
          reject(new Error(`GET ${p}: ${res.statusCode} ${data.slice(0, 200)}`));
        }
      });
    });
    req.on("timeout", () => req.destroy(new Error(`GET ${p}: timeout`)));
    req.on("error", reject);
  });
}

// everyTab waits until fn(window.__cluster, arg) is true in every tab.
function everyTab(pages, what, fn, arg) {
  return Promise.all(
    pages.map((page, i) =>
      page
        .waitForFunction(`(${fn})(window.__cluster, ${JSON.stringify(arg)})`, { timeout: remaining(), polling: 50 })
        .catch(async (err) => {
          const st = await page.evaluate(() => JSON.stringify(window.__cluster)).catch(() => "page gone");
          fail(`tab ${i}: ${what}: ${err.message.split("\n")[0]} (state ${st})`);
        })
    )
  );
}

async function run(pages) {
  // A route key for every worker.
  const routes = new Map();
  for (let k = 0; k < 400 && routes.size < opt.workers; k++) {
    const id = await get("/whoami", k);
    if (!routes.has(id.pid)) routes.set(id.pid, { route: k, worker: id.worker, pid: id.pid });
  }
  if (routes.size < opt.workers) fail(`only ${routes.size} of ${opt.workers} workers answered /whoami`);
  const workers = [...routes.values()].sort((a, b) => Number(a.worker) - Number(b.worker));

  // Pages are opened one after the other (concurrent newPage can stall DevTools), load at once.
  await Promise.all(
    pages.map(async (page, i) => {
      page.on("pageerror", (err) => out.errors.push(`tab ${i}: page error: ${err.message}`));
      const resp = await page.goto(opt.url + "/cluster-page", { waitUntil: "domcontentloaded", timeout: remaining() });
      if (!resp || !resp.ok()) fail(`tab ${i}: GET /cluster-page: ${resp ? resp.status() : "no response"}`);
    })
  );
  await everyTab(pages, "connected over WebSocket", (st) => st && st.connected && st.worker !== null && st.transport === "websocket");
  out.connected = pages.length;
  out.tabWorkers = await Promise.all(pages.map((p) => p.evaluate(() => window.__cluster.worker)));

  for (const w of workers) {
    const rec = { worker: w.worker, pid: w.pid, emitReceived: 0, fetchCount: null, ackCount: null, ackError: null };
    out.workers.push(rec);
    const id = `emit-${w.worker}-${crypto.randomBytes(4).toString("hex")}`;
    const r = await get(`/cluster/emit?id=${id}`, w.route);
    if (r.pid !== w.pid) fail(`route ${w.route} answered by pid ${r.pid}, not ${w.pid}`);
    await everyTab(pages, `io.emit from worker ${w.worker}`, (st, id) => st.bcast.includes(id), id);
    rec.emitReceived = (await Promise.all(pages.map((p) => p.evaluate((id) => window.__cluster.bcast.includes(id), id)))).filter(Boolean).length;
    rec.fetchCount = (await get("/cluster/fetch", w.route)).count;
    const ea = await get("/cluster/emit-ack", w.route);
    rec.ackCount = ea.count;
    rec.ackError = ea.error;
  }

  // A room joined in tab 0, broadcasts to it from every other worker.
  const room = `room-${crypto.randomBytes(4).toString("hex")}`;
  const joined = await pages[0].evaluate((room) => window.__join(room), room);
  out.room.worker = joined.worker;
  const sent = [];
  for (const w of workers) {
    if (w.worker === joined.worker) continue;
    const id = `room-${w.worker}-${crypto.randomBytes(4).toString("hex")}`;
    sent.push({ id, worker: w.worker });
    await get(`/cluster/room-emit?room=${room}&id=${id}`, w.route);
    const barrier = `barrier-${w.worker}-${crypto.randomBytes(4).toString("hex")}`;
    await get(`/cluster/emit?id=${barrier}`, w.route);
    await everyTab(pages, `barrier from worker ${w.worker}`, (st, id) => st.bcast.includes(id), barrier);
  }
  const rooms = await Promise.all(pages.map((p) => p.evaluate(() => window.__cluster.room)));
  for (const s of sent) {
    if (rooms[0].some((m) => m.id === s.id && m.room === room)) out.room.from.push(s.worker);
  }
  for (let i = 1; i < rooms.length; i++) out.room.leaked += rooms[i].length;
  const other = workers.find((w) => w.worker !== joined.worker) || workers[0];
  out.room.fetchCount = (await get(`/cluster/fetch?room=${room}`, other.route)).count;

  const errs = await Promise.all(pages.map((p) => p.evaluate(() => window.__cluster.errors)));
  errs.forEach((e, i) => e.forEach((m) => out.errors.push(`tab ${i}: ${m}`)));
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stickyd-chromium-"));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: opt.chromium,
      headless: true,
      userDataDir,
      timeout: remaining(),
      protocolTimeout: opt.timeoutMs + 5000,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        // Background tabs keep their timers: every tab is a live client.
        "--disable-background-timer-throttling", "--disable-renderer-backgrounding", "--disable-backgrounding-occluded-windows"],
    });
    const pages = [];
    for (let i = 0; i < opt.tabs; i++) pages.push(await browser.newPage());
    await run(pages);
  } catch (err) {
    out.errors.push(err instanceof Failed ? err.message : `driver: ${err && err.message ? err.message.split("\n")[0] : err}`);
  } finally {
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  out.durationMs = Date.now() - started;
  process.stdout.write(JSON.stringify(out) + "\n", () => process.exit(out.errors.length === 0 ? 0 : 1));
}

setTimeout(() => {
  process.stdout.write(JSON.stringify(Object.assign(out, { errors: out.errors.concat("driver hard timeout") })) + "\n", () => process.exit(1));
}, opt.timeoutMs + 15000).unref();

main().catch((err) => {
  process.stderr.write(`cluster-page.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
