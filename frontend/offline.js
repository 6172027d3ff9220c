// Offline support for the page: registers the service worker (sw.js) and, once the app is
// running (#app[data-ready=true]), sends it the URL of every file this page load fetched so
// that the next load works without a network, whichever runtime (MicroPython or Pyodide) it
// used. When the worker has cached them, <html data-offline-ready="true"> says so.
(function () {
  if (!("serviceWorker" in navigator)) return;
  var worker = navigator.serviceWorker;
  worker.register("/sw.js").catch(function () {});  // no worker: the page works, online only
  worker.addEventListener("message", function (event) {
    if (event.data && event.data.type === "cached") {
      document.documentElement.dataset.offlineReady = "true";
    }
  });

  function whenReady(callback) {
    var app = document.getElementById("app");
    if (app.dataset.ready === "true") return callback();
    var observer = new MutationObserver(function () {
      if (app.dataset.ready === "true") {
        observer.disconnect();
        callback();
      }
    });
    observer.observe(app, { attributes: true, attributeFilter: ["data-ready"] });
  }

  whenReady(function () {
    var urls = performance.getEntriesByType("resource").map(function (e) { return e.name; });
    urls.push(location.href);
    worker.ready.then(function (registration) {
      if (registration.active) registration.active.postMessage({ type: "cache", urls: urls });
    });
  });
})();
