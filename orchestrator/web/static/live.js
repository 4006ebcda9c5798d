// Live updates without reloading. The job page listens to its job's server-sent events: each
// `progress` moves the bar at once and, at most once a second, fetches the page's live part again
// (timeline, branches, counts); `final` fetches it a last time and closes the stream. The first page of
// the jobs list fetches its table again every few seconds. Forms with data-confirm ask first.
(function () {
  "use strict";

  document.addEventListener("submit", function (e) {
    var message = e.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) e.preventDefault();
  });

  var live = document.getElementById("live");
  if (!live) return;
  var fragmentUrl = live.getAttribute("data-fragment");
  var busy = false, again = false, lastFetch = 0, timer = null;

  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    lastFetch = Date.now();
    fetch(fragmentUrl, { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) { if (html !== null) live.innerHTML = html; })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) { again = false; soon(); }
      });
  }

  function soon() {
    if (timer) return;
    var wait = Math.max(0, 1000 - (Date.now() - lastFetch));
    timer = setTimeout(function () { timer = null; refresh(); }, wait);
  }

  function show(progress) {
    var bar = document.getElementById("job-progress");
    var done = document.getElementById("job-done");
    var state = document.getElementById("job-state");
    if (bar) { bar.max = progress.total; bar.value = progress.done; }
    if (done) done.textContent = progress.done + "/" + progress.total;
    if (state && progress.state !== "gone") {
      state.textContent = progress.state;
      state.className = "state big s-" + progress.state;
    }
  }

  var eventsUrl = live.getAttribute("data-events");
  if (eventsUrl && window.EventSource) {
    var source = new EventSource(eventsUrl);
    source.addEventListener("progress", function (e) {
      show(JSON.parse(e.data));
      soon();
    });
    source.addEventListener("final", function (e) {
      source.close();
      show(JSON.parse(e.data));
      refresh();
    });
    return;
  }

  var every = Number(live.getAttribute("data-refresh") || 0);
  if (every > 0) {
    setInterval(function () {
      if (document.visibilityState === "visible") refresh();
    }, every);
  }
})();
