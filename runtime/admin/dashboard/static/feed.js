// fedkit study dashboard: the live feed every tab of this dashboard shares (a SharedWorker).
// A browser opens at most six HTTP/1.1 connections to one host and port, and a live feed (an EventSource)
// holds one for as long as it is open; with one per tab, a seventh tab could load nothing. Here there is
// one EventSource per token and job shown, whatever the number of tabs; each tab gets the events of the job
// it shows, and the last ones at once when it joins. A feed closes when its last tab leaves (it says so on
// pagehide; one not heard from in FORGET_MS, crashed or frozen, is dropped and taken back when it speaks).
"use strict";

const FORGET_MS = 90000;  // above the minute a background tab's timers may be held back by the browser
const feeds = new Map();  // "token\njob" -> { source, ports: Set<MessagePort>, last: Map<event, data>, open }
const tabs = new Map();   // port -> { key, heard: time last heard from }

function post(feed, message) {
  for (const port of feed.ports) port.postMessage(message);
}

function open(token, job) {
  const query = new URLSearchParams({ token });
  if (job) query.set("job", job);
  const feed = { source: new EventSource(`/api/events?${query}`), ports: new Set(), last: new Map(), open: false };
  feed.source.onopen = () => { feed.open = true; post(feed, { kind: "conn", job, ok: true }); };
  feed.source.onerror = () => { feed.open = false; post(feed, { kind: "conn", job, ok: false }); };
  for (const name of ["status", "jobs", "job"]) {
    feed.source.addEventListener(name, (e) => {
      feed.last.set(name, e.data);
      post(feed, { kind: "event", job, name, data: e.data });
    });
  }
  return feed;
}

function leave(port) {
  const tab = tabs.get(port);
  if (!tab) return;
  tabs.delete(port);
  const feed = feeds.get(tab.key);
  if (!feed) return;
  feed.ports.delete(port);
  if (feed.ports.size === 0) {
    feed.source.close();
    feeds.delete(tab.key);
  }
}

function watch(port, token, job) {
  const key = `${token}\n${job}`;
  const tab = tabs.get(port);
  if (tab && tab.key === key) {
    tab.heard = Date.now();
    return;
  }
  leave(port);
  let feed = feeds.get(key);
  if (!feed) {
    feed = open(token, job);
    feeds.set(key, feed);
  }
  feed.ports.add(port);
  tabs.set(port, { key, heard: Date.now() });
  if (feed.open) port.postMessage({ kind: "conn", job, ok: true });
  for (const [name, data] of feed.last) port.postMessage({ kind: "event", job, name, data });
}

self.onconnect = (e) => {
  const port = e.ports[0];
  port.onmessage = (m) => {
    const { kind, token, job } = m.data || {};
    if (kind === "watch" && typeof token === "string" && typeof job === "string") watch(port, token, job);
    else if (kind === "leave") leave(port);
  };
  port.addEventListener("close", () => leave(port));  // where the browser says so (Chromium 122+)
};

setInterval(() => {
  const now = Date.now();
  for (const [port, tab] of tabs) if (now - tab.heard > FORGET_MS) leave(port);
}, FORGET_MS / 3);
