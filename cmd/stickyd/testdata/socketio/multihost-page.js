"use strict";
// multihost-page.js — a real Chromium through the balancer's cookie frontends (multi-host
// e2e). For each --url: a fresh browser context opens multihost-app.js's page (socket.io,
// polling transport only), waits for the serving {host, worker, pid} in document.title,
// then reloads the page --reloads times; every reload is a new engine.io session whose
// handshake carries the affinity cookie. Then, for each other host of --hosts, it sets the
// --cookie given after that --url to the host's name and reloads: the cookie, not chance,
// must decide the host. Prints one JSON line
//   {pages: [{url, hosts: [...], cookies: {name: value}, steered: {want: got}, polls,
//    pollStatuses}], errors}
// The browser is $CHROMIUM or --chromium, default /usr/bin/chromium.
const fs = require("fs");
const os = require("os");
const path = require("path");
const puppeteer = require("puppeteer-core");

const opt = { urls: [], cookies: [], hosts: [], reloads: 4, timeoutMs: 60000, chromium: process.env.CHROMIUM || "/usr/bin/chromium" };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const next = () => process.argv[++i];
  switch (a) {
    case "--url": opt.urls.push(next()); break;
    case "--cookie": opt.cookies[opt.urls.length - 1] = next(); break;
    case "--hosts": opt.hosts = next().split(","); break;
    case "--reloads": opt.reloads = Number(next()); break;
    case "--timeout-ms": opt.timeoutMs = Number(next()); break;
    case "--chromium": opt.chromium = next(); break;
    default:
      process.stderr.write(`multihost-page.js: unknown argument ${a}\n`);
      process.exit(2);
  }
}

async function identity(page) {
  await page.waitForFunction(() => document.title.startsWith("{") || document.title.startsWith("error"), { timeout: 20000 });
  const t = await page.title();
  if (!t.startsWith("{")) throw new Error(`page says ${t}`);
  return JSON.parse(t);
}

async function main() {
  const out = { pages: [], errors: [] };
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stickyd-chromium-"));
  let browser;
  const timer = setTimeout(() => {
    out.errors.push("timeout");
    process.stdout.write(JSON.stringify(out) + "\n");
    process.exit(1);
  }, opt.timeoutMs);
  try {
    browser = await puppeteer.launch({
      executablePath: opt.chromium,
      headless: true,
      userDataDir,
      args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server"],
    });
    for (const [u, url] of opt.urls.entries()) {
      const ctx = await browser.createBrowserContext();
      const page = await ctx.newPage();
      const rec = { url, hosts: [], cookies: {}, steered: {}, polls: 0, pollStatuses: {} };
      page.on("response", (r) => {
        if (!r.url().includes("/socket.io/?")) return;
        rec.polls++;
        rec.pollStatuses[r.status()] = (rec.pollStatuses[r.status()] || 0) + 1;
      });
      await page.goto(url, { waitUntil: "load" });
      rec.hosts.push((await identity(page)).host);
      for (let i = 0; i < opt.reloads; i++) {
        await page.evaluate(() => { document.title = "reloading"; });
        await page.reload({ waitUntil: "load" });
        rec.hosts.push((await identity(page)).host);
      }
      for (const c of await page.cookies()) rec.cookies[c.name] = c.value;
      for (const h of opt.hosts) {
        if (!opt.cookies[u] || h === rec.hosts[0]) continue;
        await page.setCookie({ name: opt.cookies[u], value: h, url, path: "/", httpOnly: true });
        await page.evaluate(() => { document.title = "reloading"; });
        await page.reload({ waitUntil: "load" });
        rec.steered[h] = (await identity(page)).host;
      }
      out.pages.push(rec);
      await ctx.close();
    }
  } catch (err) {
    out.errors.push(String(err.message || err).split("\n")[0]);
  } finally {
    clearTimeout(timer);
    if (browser) await browser.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
  process.stdout.write(JSON.stringify(out) + "\n");
  process.exit(out.errors.length ? 1 : 0);
}
main();
