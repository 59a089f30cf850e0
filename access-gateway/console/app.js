// The operator console: a client of the gateway's REST API, with the API key kept in this
// tab's session storage (sent as a bearer token, never put in a URL).
"use strict";

const KEY = "wallet-console-key";
let me = null;
let clusterTimer = null;

const $ = (id) => document.getElementById(id);

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function idempotencyKey() {
  const bytes = new Uint8Array(16);
  crypto.getRandomValues(bytes);
  return "console-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + sessionStorage.getItem(KEY) };
  if (method === "POST") {
    headers["Idempotency-Key"] = idempotencyKey();
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, {
    method,
    headers,
    body: method === "POST" ? JSON.stringify(body ?? {}) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const problem = data.title || response.statusText;
    throw new Error(data.detail ? `${problem}: ${data.detail}` : problem);
  }
  return data;
}

/// Runs an action, showing its error (and changing nothing else) when it fails.
async function attempt(action) {
  try {
    showError("");
    await action();
    return true;
  } catch (error) {
    showError(error.message);
    return false;
  }
}

const isAdmin = () => me && me.scopes.includes("admin");
const isOperator = () => me && me.scopes.includes("operator");

// ---- Sign-in ----

async function signIn(key) {
  sessionStorage.setItem(KEY, key);
  try {
    me = await api("GET", "/v1/me");
  } catch (error) {
    sessionStorage.removeItem(KEY);
    throw error;
  }
  $("who").textContent = `${me.tenant_id} · ${isAdmin() ? "admin" : "read-only"}`;
  // The platform's status is for admins.
  $("cluster-link").hidden = !isOperator();
  $("nav").hidden = false;
  if (!location.hash || location.hash === "#/") location.hash = "#/hierarchy";
  await route();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  me = null;
  // Nothing the last operator saw stays on the page.
  for (const id of ["tree", "account", "transaction", "in-flight", "who", "groups", "found"]) {
    $(id).replaceChildren();
  }
  $("nav").hidden = true;
  showError("");
  location.hash = "";
  show("sign-in");
}

function show(section) {
  for (const id of ["sign-in", "hierarchy", "accounts", "transactions", "cluster"]) {
    $(id).hidden = id !== section;
  }
  clearInterval(clusterTimer);
}

async function route() {
  if (!me) return show("sign-in");
  const page = (location.hash.replace("#/", "") || "hierarchy").split("/")[0];
  if (page === "accounts") show("accounts");
  else if (page === "transactions") {
    show("transactions");
    await attempt(loadInFlight);
  } else if (page === "cluster") {
    show("cluster");
    await attempt(loadCluster);
    // Live: refreshed every two seconds while the page is shown.
    clusterTimer = setInterval(() => attempt(loadCluster), 2000);
  }
  else {
    show("hierarchy");
    await attempt(loadTree);
  }
}

// ---- Hierarchy ----

function balancesText(node) {
  if (!node.balances.length) return "no balance";
  return node.balances.map((b) => `${b.currency} ${b.balance}`).join(" · ");
}

function control(labelText, input, buttonText, onSubmit) {
  const id = "c-" + Math.random().toString(36).slice(2);
  input.id = id;
  const form = element("form", { class: "control" },
    element("label", { for: id, text: labelText }), input,
    element("button", { type: "submit", text: buttonText }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (await attempt(() => onSubmit(input.value))) await attempt(loadTree);
  });
  return form;
}

function nodeControls(node, nodes) {
  const controls = element("div", { class: "controls" });
  controls.append(control(`Child name for ${node.name}`, element("input", { required: "", maxlength: "64" }),
    "Add child", (name) => api("POST", "/v1/hierarchy/nodes", { name, parent_id: node.node_id })));
  controls.append(control(`New name for ${node.name}`, element("input", { required: "", maxlength: "64" }),
    "Rename", (name) => api("POST", `/v1/hierarchy/nodes/${node.node_id}/rename`, { name })));
  const parent = element("select");
  parent.append(element("option", { value: "", text: "(make it a root)" }));
  for (const other of nodes) {
    if (other.node_id !== node.node_id) {
      parent.append(element("option", { value: other.node_id, text: other.name }));
    }
  }
  controls.append(control(`Move ${node.name} under`, parent, "Move",
    (parent_id) => api("POST", `/v1/hierarchy/nodes/${node.node_id}/move`, { parent_id: parent_id || null })));
  controls.append(control(`Wallet to attach to ${node.name}`, element("input", { required: "" }),
    "Attach", (wallet_id) => api("POST", `/v1/hierarchy/nodes/${node.node_id}/attach`, { wallet_id })));
  const remove = element("button", { type: "button", text: "Delete", "aria-label": `Delete ${node.name}` });
  remove.addEventListener("click", async () => {
    if (!confirm(`Delete the node ${node.name}?`)) return;
    if (await attempt(() => api("POST", `/v1/hierarchy/nodes/${node.node_id}/delete`))) await attempt(loadTree);
  });
  controls.append(remove);
  return controls;
}

function renderNode(node, byId, nodes) {
  const item = element("li", { class: "node", "data-node": node.name },
    element("span", { class: "node-name", text: node.name }),
    element("span", { class: "balance", "data-balance-of": node.name, text: balancesText(node) }),
    element("span", { class: "seq", text: `consistent with ${node.consistent_with || "-"}` }));
  if (node.wallet_ids.length) {
    const wallets = element("ul", { class: "wallets", "aria-label": `Wallets of ${node.name}` });
    for (const wallet of node.wallet_ids) {
      const entry = element("li", {}, element("a", { href: `#/accounts/${wallet}`, text: wallet }));
      if (isAdmin()) {
        const detach = element("button", { type: "button", text: "Detach", "aria-label": `Detach ${wallet} from ${node.name}` });
        detach.addEventListener("click", async () => {
          const done = await attempt(() => api("POST", `/v1/hierarchy/nodes/${node.node_id}/detach`, { wallet_id: wallet }));
          if (done) await attempt(loadTree);
        });
        entry.append(" ", detach);
      }
      wallets.append(entry);
    }
    item.append(wallets);
  }
  if (isAdmin()) item.append(nodeControls(node, nodes));
  const children = node.child_node_ids.map((id) => byId.get(id)).filter(Boolean);
  if (children.length) {
    const group = element("ul", { "aria-label": `Children of ${node.name}` });
    for (const child of children) group.append(renderNode(child, byId, nodes));
    item.append(group);
  }
  return item;
}

async function loadTree() {
  const { nodes } = await api("GET", "/v1/hierarchy");
  const byId = new Map(nodes.map((node) => [node.node_id, node]));
  const tree = $("tree");
  tree.replaceChildren();
  for (const root of nodes.filter((node) => !node.parent_id)) {
    tree.append(renderNode(root, byId, nodes));
  }
  if (!nodes.length) tree.append(element("li", { text: "No nodes yet." }));
  $("new-root").hidden = !isAdmin();
}

// ---- Accounts and transactions ----

function table(headers, rows) {
  const head = element("tr", {}, ...headers.map((h) => element("th", { scope: "col", text: h })));
  const body = rows.map((cells) => element("tr", {}, ...cells.map((cell, index) =>
    element("td", { class: index > 0 && /^-?\d/.test(cell) ? "amount" : "", text: cell }))));
  return element("table", {}, element("thead", {}, head), element("tbody", {}, ...body));
}

async function showAccount(walletId) {
  const wallet = await api("GET", `/v1/wallets/${encodeURIComponent(walletId)}`);
  const feed = await api("GET", `/v1/wallets/${encodeURIComponent(walletId)}/activities?page_size=50`);
  $("account").replaceChildren(
    element("h3", { text: `${wallet.wallet_id} (${wallet.owner_id})` }),
    table(["field", "value"], [
      ["state", wallet.state], ["currency", wallet.currency], ["balance", wallet.balance],
      ["available", wallet.available], ["pending out", wallet.pending_out],
      ["pending in", wallet.pending_in], ["lower limit", wallet.limits.lower ?? "none"],
      ["upper limit", wallet.limits.upper ?? "none"], ["version", String(wallet.version)],
    ]),
    element("h4", { text: "Versions, newest first" }),
    element("div", { id: "versions" }),
    element("h4", { text: "Activity, newest first" }),
    table(["when", "kind", "amount", "counterparty", "transaction"], feed.activities.map((a) => [
      new Date(a.occurred_at_ms).toISOString(), a.kind, a.amount, a.counterparty ?? "", a.transaction_id ?? "",
    ])));
  await showVersions(walletId);
}

/// One page of a wallet's versions, older pages appended by the button below it.
async function showVersions(walletId, beforeVersion) {
  const query = beforeVersion ? `&before_version=${beforeVersion}` : "";
  const page = await api("GET", `/v1/wallets/${encodeURIComponent(walletId)}/versions?page_size=10${query}`);
  const box = $("versions");
  box.querySelector("button")?.remove();
  box.append(table(["version", "state", "balance", "available", "pending out", "pending in", "seq", "when"],
    page.versions.map((v) => [String(v.version), v.state, v.balance, v.available, v.pending_out,
      v.pending_in, String(v.seq), new Date(v.at_ms).toISOString()])));
  if (page.next_before_version) {
    const older = element("button", { type: "button", text: "Older versions" });
    older.addEventListener("click", () => attempt(() => showVersions(walletId, page.next_before_version)));
    box.append(older);
  }
}

async function showTransaction(transactionId) {
  const t = await api("GET", `/v1/transactions/${encodeURIComponent(transactionId)}`);
  const when = (ms) => new Date(ms).toISOString();
  const changes = [["begun (pending)", when(t.created_at_ms)]];
  if (t.decided_at_ms) changes.push([`decided: ${t.status}`, when(t.decided_at_ms)]);
  if (t.failure) changes.push(["failure", t.failure]);
  changes.push(["every shard settled", t.done ? "yes" : "not yet"]);
  $("transaction").replaceChildren(
    element("h3", { text: `${t.transaction_id}: ${t.kind} ${t.status}${t.done ? " (done)" : ""}` }),
    table(["status change", "at"], changes),
    table(["account", "amount", "currency"], t.legs.map((l) => [l.account, l.amount, l.currency])));
}

async function loadCluster() {
  const { groups } = await api("GET", "/v1/admin/cluster");
  const dash = (value) => (value === null || value === undefined ? "-" : String(value));
  const rows = groups.map((g) => [
    `${g.kind} ${g.group_id}`, dash(g.leader_node_id), dash(g.term), String(g.applied_seq),
    g.replicas.map((r) => `${r.address} ${r.reachable ? r.state : "unreachable"}`).join(", "),
    dash(g.in_flight), g.projection ? String(g.projection.applied_seq) : "-",
    g.projection ? String(g.projection.lag_events) : "-",
  ]);
  $("groups").replaceChildren(table(
    ["group", "leader", "term", "applied seq", "members", "in flight", "projected seq", "projection lag"], rows));
  $("cluster-updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

/// An admin action on one transaction, after the operator confirms it.
async function intervene(transactionId, action, question) {
  if (!confirm(question)) return;
  const done = await attempt(() => api("POST", `/v1/admin/transactions/${transactionId}/${action}`));
  if (done) await attempt(loadInFlight);
}

async function loadInFlight() {
  const { transactions } = await api("GET", "/v1/admin/in-flight");
  const box = $("in-flight");
  if (!transactions.length) {
    box.replaceChildren(element("p", { text: "Nothing in flight." }));
    return;
  }
  const rows = transactions.map(({ transaction: t, age_ms, coordinator_shard_id }) => {
    const actions = element("td");
    if (isAdmin()) {
      const retry = element("button", { type: "button", text: "Retry now", "aria-label": `Retry ${t.transaction_id} now` });
      retry.addEventListener("click", () =>
        intervene(t.transaction_id, "retry", `Drive ${t.transaction_id} again now?`));
      actions.append(retry);
      if (t.status === "pending") {
        const abort = element("button", { type: "button", text: "Force abort", "aria-label": `Force abort ${t.transaction_id}` });
        abort.addEventListener("click", () =>
          intervene(t.transaction_id, "abort", `Abort ${t.transaction_id}? Nothing of it will move.`));
        actions.append(abort);
      }
    }
    return element("tr", {},
      element("td", {}, element("a", { href: `#/transactions/${t.transaction_id}`, text: t.transaction_id })),
      element("td", { text: t.kind }), element("td", { text: t.status }),
      element("td", { class: "amount", text: `${(age_ms / 1000).toFixed(1)} s` }),
      element("td", { text: String(coordinator_shard_id) }), actions);
  });
  const head = element("tr", {}, ...["transaction", "kind", "status", "age", "coordinator shard", "actions"]
    .map((h) => element("th", { scope: "col", text: h })));
  box.replaceChildren(element("table", {}, element("thead", {}, head), element("tbody", {}, ...rows)));
}

document.addEventListener("DOMContentLoaded", async () => {
  $("sign-in-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = $("api-key");
    if (await attempt(() => signIn(input.value.trim()))) input.value = "";
  });
  $("sign-out").addEventListener("click", signOut);
  $("refresh-tree").addEventListener("click", () => attempt(loadTree));
  $("refresh-in-flight").addEventListener("click", () => attempt(loadInFlight));
  $("new-root").addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = $("new-root-name");
    const done = await attempt(() => api("POST", "/v1/hierarchy/nodes", { name: name.value }));
    if (done) {
      name.value = "";
      await attempt(loadTree);
    }
  });
  $("account-search").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("account-id").value.trim();
    if (/^wal_[0-9a-f]{24}$/.test(text)) {
      location.hash = `#/accounts/${text}`;
      return;
    }
    await attempt(async () => {
      const { wallet_ids } = await api("GET", `/v1/wallets?owner_id=${encodeURIComponent(text)}`);
      const found = $("found");
      found.replaceChildren(...wallet_ids.map((id) =>
        element("li", {}, element("a", { href: `#/accounts/${id}`, text: id }))));
      if (!wallet_ids.length) found.append(element("li", { text: `No wallet of ${text}.` }));
    });
  });
  $("transaction-search").addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/transactions/${$("transaction-id").value.trim()}`;
  });
  window.addEventListener("hashchange", async () => {
    await route();
    const [page, id] = location.hash.replace("#/", "").split("/");
    if (me && id && page === "accounts") await attempt(() => showAccount(id));
    if (me && id && page === "transactions") await attempt(() => showTransaction(id));
  });
  const key = sessionStorage.getItem(KEY);
  if (key) await attempt(() => signIn(key));
  else show("sign-in");
});
