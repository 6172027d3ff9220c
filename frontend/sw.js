// tokenwire's service worker: keeps the app shell so that the page loads without a network
// (a reload while offline shows the queued messages, which localStorage kept, and sends them
// once the network is back).
//
// What it caches, and how (an allow-list: anything else goes to the network untouched):
// - the app's own files (/, /style.css, /offline.js, /main.py, /pyscript/<runtime>.json and
//   the /tokenwire/**.py modules PyScript fetches): network first, so a deploy shows at once;
//   the cached copy answers when the network fails, or has not answered in NETWORK_TIMEOUT
//   (a black-holed network never fails by itself);
// - /vendor/** (PyScript and its interpreters, pinned by frontend/package-lock.json): cache
//   first. Their URLs carry no version, so each online page load revalidates them in the
//   background (an ETag round trip each) and replaces a copy that changed: after an upgrade
//   the page runs the previous, complete set once, then the new one.
// Never cached: /api/*, /ws, /metrics, /healthz, /readyz (live data, never an old copy).
//
// Pages do not list what they need: PyScript fetches chunks and interpreter files by itself,
// partly before this worker controls a first visit. So once the app is running, offline.js
// sends the URLs of everything the page loaded (the Resource Timing entries) and this worker
// caches those it is allowed to, then answers {type: "cached"}.

const SHELL_CACHE = "tokenwire-shell-v1";
const VENDOR_CACHE = "tokenwire-vendor-v1";
const NETWORK_TIMEOUT = 5000; // ms before a cached copy of the app's own file is served
const MAX_URLS = 500; // the most URLs one "cache" message may ask for

const SHELL_FILES = ["/", "/index.html", "/style.css", "/offline.js", "/main.py"];
const SHELL_PATTERNS = [/^\/pyscript\/[a-z]+\.json$/, /^\/tokenwire\/[A-Za-z0-9_/]+\.py$/];

function kindOf(url) {
  if (url.origin !== self.location.origin) return null;
  const path = url.pathname;
  if (path.startsWith("/vendor/")) return "vendor";
  if (SHELL_FILES.includes(path) || SHELL_PATTERNS.some((p) => p.test(path))) return "shell";
  return null;
}

self.addEventListener("install", () => self.skipWaiting());

self.addEventListener("activate", (event) => {
  const keep = [SHELL_CACHE, VENDOR_CACHE];
  event.waitUntil(
    caches
      .keys()
      .then((names) =>
        Promise.all(
          names.filter((n) => n.startsWith("tokenwire-") && !keep.includes(n)).map((n) => caches.delete(n)),
        ),
      )
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const request = event.request;
  if (request.method !== "GET") return;
  const kind = kindOf(new URL(request.url));
  if (kind === "vendor") event.respondWith(cacheFirst(request));
  else if (kind === "shell") event.respondWith(networkFirst(request));
});

// Vendor responses vary on Accept-Encoding, which a service worker's requests never carry.
const MATCH = { ignoreVary: true };

async function cacheFirst(request) {
  const cache = await caches.open(VENDOR_CACHE);
  const hit = await cache.match(request, MATCH);
  if (hit) return hit;
  const response = await fetch(request);
  if (response.status === 200) await cache.put(request, response.clone());
  return response;
}

async function networkFirst(request) {
  const cache = await caches.open(SHELL_CACHE);
  // A page may be opened with a query (?runtime=pyodide): any cached copy of it will do.
  const options = request.mode === "navigate" ? { ...MATCH, ignoreSearch: true } : MATCH;
  const network = fetch(request).then(async (response) => {
    if (response.status === 200) await cache.put(request, response.clone());
    return response;
  });
  const slow = new Promise((resolve) => setTimeout(resolve, NETWORK_TIMEOUT)).then(
    async () => (await cache.match(request, options)) || network,
  );
  try {
    return await Promise.race([network, slow]);
  } catch (error) {
    const hit = await cache.match(request, options);
    if (hit) return hit;
    throw error;
  }
}

self.addEventListener("message", (event) => {
  const data = event.data;
  if (!data || data.type !== "cache" || !Array.isArray(data.urls)) return;
  event.waitUntil(
    cacheAll(data.urls.slice(0, MAX_URLS)).then((count) => {
      if (event.source) event.source.postMessage({ type: "cached", count: count });
    }),
  );
});

async function cacheAll(urls) {
  let count = 0;
  for (const href of new Set(urls.map((u) => new URL(u, self.location.origin).href))) {
    const url = new URL(href);
    const kind = kindOf(url);
    if (kind === null) continue;
    try {
      if (await cacheOne(url, kind)) count += 1;
    } catch (error) {
      // Offline again, or the server is gone: whatever is cached stays; next load retries.
    }
  }
  return count;
}

async function cacheOne(url, kind) {
  const cache = await caches.open(kind === "vendor" ? VENDOR_CACHE : SHELL_CACHE);
  const key = url.href;
  const cached = await cache.match(key, MATCH);
  if (kind === "shell" && cached) return true; // kept fresh by networkFirst
  // A cached vendor file is revalidated (If-None-Match): a 304 costs a round trip only.
  const response = await fetch(key, { cache: cached ? "no-cache" : "default" });
  if (response.status !== 200) return false;
  const etag = response.headers.get("ETag");
  if (cached && etag && cached.headers.get("ETag") === etag) return true;
  await cache.put(key, response);
  return true;
}
