"use strict";
// status-page.js — reads stickyd's status page (the admin port's /) in a real headless
// Chromium, as an operator's browser shows it.
//
//   node status-page.js --url http://127.0.0.1:PORT/ --screenshot out.png
//       [--phone-screenshot phone.png] [--wait-websockets N] [--timeout-ms 45000]
//
// Prints one JSON line per phase (the page as displayed, read from the DOM):
//   {"phase":"initial", ...}  once the page has rendered a first answer of /admin/status;
//   {"phase":"loaded", ...}   once its worker table shows at least N WebSockets in all
//                             and it has updated in place since "initial" (no reload).
// Then it takes the screenshots (desktop 1200 wide, and phone 390 wide) and prints
// {"phase":"done", "phoneOverflow": px, "errors": [...]}. Exits 0 only without errors.
// The browser is $CHROMIUM or --chromium, default /usr/bin/chromium.

const fs = require("fs");
const os = require("os");
const path = require("path");
const puppeteer = require("puppeteer-core");

const o = { url: "", screenshot: "", phone: "", waitWS: 0, timeoutMs: 45000, chromium: process.env.CHROMIUM || "/usr/bin/chromium" };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i], v = () => process.argv[++i];
  switch (a) {
    case "--url": o.url = v(); break;
    case "--screenshot": o.screenshot = v(); break;
    case "--phone-screenshot": o.phone = v(); break;
    case "--wait-websockets": o.waitWS = Number(v()); break;
    case "--timeout-ms": o.timeoutMs = Number(v()); break;
    case "--chromium": o.chromium = v(); break;
    default: process.stderr.write(`status-page.js: unknown argument ${a}\n`); process.exit(2);
  }
}
if (!o.url) { process.stderr.write("status-page.js: --url is required\n"); process.exit(2); }

const errors = [];
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");

// read returns what the page displays: the cards, every worker row, the rejections and
// how many points each chart draws.
function read(page) {
  return page.evaluate(() => {
    const txt = (id) => (document.getElementById(id).textContent || "").trim();
    const num = (s) => Number(String(s).replace(/[^0-9.-]/g, ""));
    const workers = [...document.querySelectorAll("#workers tbody tr")].map((tr) => {
      const c = (k) => (tr.querySelector(`td[data-k="${k}"]`).textContent || "").trim();
      return {
        pool: c("pool"), slot: num(c("slot")), pid: num(c("pid")), state: c("state"),
        sessions: num(c("sessions")), websockets: num(c("websockets")), handoffs: num(c("handoffs")),
        requests: num(c("requests")), restarts: num(c("restarts")), uptime: c("uptime"),
      };
    });
    const points = (id) => [...document.querySelectorAll(`#${id} polyline`)].map((p) => (p.getAttribute("points") || "").split(" ").filter(Boolean).length);
    return {
      updates: Number(document.body.dataset.updates),
      state: document.body.dataset.state,
      ready: txt("edge-ready"),
      version: txt("edge-version"), generation: num(txt("edge-generation")), pid: num(txt("edge-pid")),
      uptime: txt("edge-uptime"), sessions: num(txt("edge-sessions")), connections: num(txt("edge-conns")),
      handoffs: num(txt("edge-handoffs")), requests: num(txt("edge-requests")),
      rateHandoffs: txt("rate-handoffs"), rateRequests: txt("rate-requests"),
      handoffsMax: (document.querySelector("#chart-handoffs text") || {}).textContent || "",
      requestsMax: (document.querySelector("#chart-requests text") || {}).textContent || "",
      chartPoints: { handoffs: points("chart-handoffs"), requests: points("chart-requests"), sessions: points("chart-sessions") },
      rejections: [...document.querySelectorAll("#rejections tr[data-reason]")].map((tr) => tr.dataset.reason),
      workers,
      navigations: performance.getEntriesByType("navigation").length,
      marker: window.__stickydMarker === true,
    };
  });
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stickyd-chromium-"));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: o.chromium, headless: true, userDataDir, timeout: o.timeoutMs, protocolTimeout: o.timeoutMs + 5000,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const page = await browser.newPage();
    page.on("pageerror", (e) => errors.push("page error: " + e.message));
    page.on("console", (m) => { if (m.type() === "error") errors.push("console: " + m.text()); });
    page.on("requestfailed", (r) => errors.push("request failed: " + r.url() + " " + (r.failure() || {}).errorText));
    page.on("request", (r) => { if (!r.url().startsWith(new URL(o.url).origin)) errors.push("external request: " + r.url()); });
    await page.setViewport({ width: 1200, height: 900 });
    const resp = await page.goto(o.url, { waitUntil: "domcontentloaded", timeout: o.timeoutMs });
    if (!resp || !resp.ok()) throw new Error(`GET ${o.url}: HTTP ${resp ? resp.status() : "none"}`);
    await page.waitForFunction(() => Number(document.body.dataset.updates) >= 1 && document.querySelectorAll("#workers tbody tr").length > 0, { timeout: o.timeoutMs, polling: 100 });
    // A marker that a reload would lose: the "loaded" phase proves in-place updates.
    await page.evaluate(() => { window.__stickydMarker = true; });
    const first = await read(page);
    out({ phase: "initial", ...first });
    await page.waitForFunction(
      (want, after) => {
        const sum = [...document.querySelectorAll('#workers td[data-k="websockets"]')].reduce((s, td) => s + Number(td.textContent.replace(/[^0-9]/g, "")), 0);
        return sum >= want && Number(document.body.dataset.updates) > after + 1;
      },
      { timeout: o.timeoutMs, polling: 100 }, o.waitWS, first.updates
    );
    out({ phase: "loaded", ...(await read(page)) });
    if (o.screenshot) await page.screenshot({ path: o.screenshot, fullPage: true });
    let phoneOverflow = -1;
    if (o.phone) {
      await page.setViewport({ width: 390, height: 844, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
      const n = await page.evaluate(() => Number(document.body.dataset.updates));
      await page.waitForFunction((n) => Number(document.body.dataset.updates) > n, { timeout: o.timeoutMs, polling: 100 }, n);
      phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      await page.screenshot({ path: o.phone, fullPage: true });
    }
    out({ phase: "done", phoneOverflow, errors });
  } catch (e) {
    errors.push(e.message.split("\n")[0]);
    out({ phase: "done", phoneOverflow: -1, errors });
  } finally {
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  process.exitCode = errors.length ? 1 : 0;
}

setTimeout(() => { out({ phase: "done", errors: ["driver hard timeout"] }); process.exit(1); }, 2 * o.timeoutMs + 20000).unref();
main();
