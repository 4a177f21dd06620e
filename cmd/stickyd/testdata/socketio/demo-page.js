"use strict";
// demo-page.js — drives stickyd's demo page in a real headless Chromium.
//
//   node demo-page.js --url http://127.0.0.1:PORT/ [--tabs 4] [--timeout-ms 20000]
//       [--screenshot out.png] [--chromium /usr/bin/chromium]
//
// Opens N tabs in ONE browser (they share its keep-alive connection pool). In
// each tab: wait for document.body.dataset.state === "connected" and #worker
// text matching /worker \d+ \(pid \d+\)/, type a unique text into #msg, click
// #send, wait until #log contains it. Prints one JSON line
// {tabs, connected, echoed, workers, errors, durationMs} and exits 0 only if
// every tab connected and echoed and no page error happened.
// The browser is $CHROMIUM or --chromium, default /usr/bin/chromium.

const fs = require("fs");
const os = require("os");
const path = require("path");
const crypto = require("crypto");
const puppeteer = require("puppeteer-core");

function parseArgs(argv) {
  const o = {
    url: "",
    tabs: 4,
    timeoutMs: 20000,
    screenshot: "",
    chromium: process.env.CHROMIUM || "/usr/bin/chromium",
  };
  for (let i = 2; i < argv.length; i++) {
    const a = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) usage(`missing value for ${a}`);
      return argv[++i];
    };
    switch (a) {
      case "--url": o.url = next(); break;
      case "--tabs": o.tabs = Number(next()); break;
      case "--timeout-ms": o.timeoutMs = Number(next()); break;
      case "--screenshot": o.screenshot = next(); break;
      case "--chromium": o.chromium = next(); break;
      case "-h": case "--help": usage(""); break;
      default: usage(`unknown argument ${a}`);
    }
  }
  if (!o.url) usage("--url is required");
  if (!(o.tabs >= 1) || !(o.timeoutMs > 0)) usage("--tabs and --timeout-ms must be positive");
  return o;
}

function usage(msg) {
  if (msg) process.stderr.write(`demo-page.js: ${msg}\n`);
  process.stderr.write(
    "usage: node demo-page.js --url URL [--tabs N] [--timeout-ms N] [--screenshot out.png] [--chromium PATH]\n"
  );
  process.exit(2);
}

const opt = parseArgs(process.argv);
const started = Date.now();
const deadline = started + opt.timeoutMs;
const remaining = () => Math.max(1, deadline - Date.now());

const VERBOSE = process.env.DEMO_PAGE_VERBOSE === "1";
function verbose(msg) {
  if (VERBOSE) process.stderr.write(`demo-page.js: +${Date.now() - started}ms ${msg}\n`);
}
function withTimeout(p, what) {
  let t;
  return Promise.race([
    p,
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timeout: ${what}`)), remaining());
    }),
  ]).finally(() => clearTimeout(t));
}

let inputChain = Promise.resolve();
function inputLock(fn) {
  const run = inputChain.then(fn);
  inputChain = run.catch(() => {});
  return run;
}

const WORKER_RE = /worker \d+ \(pid \d+\)/;

async function runTab(page, i, res) {
  page.on("pageerror", (err) => res.errors.push(`tab ${i}: page error: ${err.message}`));
  page.on("requestfailed", (req) => {
    const f = req.failure();
    // Aborted requests on teardown are not failures of the page.
    if (f && !/ERR_ABORTED/.test(f.errorText)) res.errors.push(`tab ${i}: request failed: ${req.url()} ${f.errorText}`);
  });
  let stage = "load";
  try {
    const resp = await page.goto(opt.url, { waitUntil: "domcontentloaded", timeout: remaining() });
    if (!resp || !resp.ok()) throw new Error(`GET ${opt.url}: HTTP ${resp ? resp.status() : "no response"}`);
    stage = "connected state";
    verbose(`tab ${i}: ${stage}`);
    await page.waitForFunction(
      (reSrc) => {
        const w = document.querySelector("#worker");
        return (
          document.body &&
          document.body.dataset.state === "connected" &&
          w !== null &&
          new RegExp(reSrc).test(w.textContent || "")
        );
      },
      { timeout: remaining(), polling: 50 },
      WORKER_RE.source
    );
    res.connected++;
    const workerText = await page.$eval("#worker", (el) => (el.textContent || "").trim());
    res.workers[i] = workerText;

    stage = "echo";
    verbose(`tab ${i}: ${stage}`);
    const text = `tab ${i} says ${crypto.randomBytes(4).toString("hex")}`;
    // Keyboard and mouse input reaches only the focused tab: type and click
    // one tab at a time, with that tab brought to the front.
    await inputLock(async () => {
      await withTimeout(page.bringToFront(), "bring tab to front");
      await page.$eval("#msg", (el) => {
        el.value = "";
        el.focus();
      });
      await withTimeout(page.type("#msg", text), "type into #msg");
      await withTimeout(page.click("#send"), "click #send");
    });
    await page.waitForFunction(
      (t) => {
        const log = document.querySelector("#log");
        return log !== null && (log.textContent || "").includes(t);
      },
      { timeout: remaining(), polling: 50 },
      text
    );
    res.echoed++;
    if (opt.screenshot && i === 0) {
      await page.screenshot({ path: opt.screenshot, fullPage: true });
    }
  } catch (err) {
    let state = "";
    try {
      state = await page.evaluate(() => {
        const w = document.querySelector("#worker");
        return `state=${document.body && document.body.dataset.state} worker=${w && w.textContent}`;
      });
    } catch (_) {
      /* page gone */
    }
    res.errors.push(`tab ${i}: ${stage}: ${err.message.split("\n")[0]}${state ? ` (${state})` : ""}`);
    if (opt.screenshot && i === 0) {
      try {
        await page.screenshot({ path: opt.screenshot, fullPage: true });
      } catch (_) {
        /* ignore */
      }
    }
  }
}

async function main() {
  const res = { tabs: opt.tabs, connected: 0, echoed: 0, workers: new Array(opt.tabs).fill(null), errors: [] };
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stickyd-chromium-"));
  let browser;
  try {
    browser = await puppeteer.launch({
      executablePath: opt.chromium,
      headless: true,
      userDataDir,
      timeout: remaining(),
      protocolTimeout: opt.timeoutMs + 5000,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        // TLS at the edge with a test certificate: trust exactly that key (base64 of the
        // SHA-256 of its SubjectPublicKeyInfo), as a CA-signed one would be trusted.
        ...(process.env.CHROMIUM_SPKI ? ["--ignore-certificate-errors-spki-list=" + process.env.CHROMIUM_SPKI] : []),
      ],
    });
    // Pages are opened one after the other (concurrent newPage calls can
    // stall the DevTools session), then driven concurrently.
    const pages = [];
    for (let i = 0; i < opt.tabs; i++) {
      verbose(`tab ${i}: newPage`);
      pages.push(await withTimeout(browser.newPage(), `tab ${i}: open`));
    }
    await Promise.all(pages.map((page, i) => runTab(page, i, res)));
  } catch (err) {
    res.errors.push(`browser: ${err.message.split("\n")[0]}`);
  } finally {
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  res.durationMs = Date.now() - started;
  const ok = res.connected === opt.tabs && res.echoed === opt.tabs && res.errors.length === 0;
  process.stdout.write(JSON.stringify(res) + "\n", () => process.exit(ok ? 0 : 1));
}

// Hard stop: never outlive the timeout by much, whatever hangs.
setTimeout(() => {
  process.stdout.write(
    JSON.stringify({ tabs: opt.tabs, connected: 0, echoed: 0, workers: [], errors: ["driver hard timeout"] }) + "\n",
    () => process.exit(1)
  );
}, opt.timeoutMs + 15000).unref();

main().catch((err) => {
  process.stderr.write(`demo-page.js: ${err && err.stack ? err.stack : err}\n`);
  process.exit(3);
});
