// The operator console in headless Chromium against a real cluster (started by the Rust test
// `console::the_console_edits_hierarchies_in_a_real_browser`, which passes everything in the
// environment). Exits non-zero, with the reason and a screenshot, at the first failed step.
"use strict";

const { chromium } = require(process.env.PLAYWRIGHT_CORE);

const url = process.env.GATEWAY_URL;
const [alice, bob] = process.env.WALLETS.split(",");
const shots = process.env.SCREENSHOTS;
const WAIT_MS = 20_000;

async function api(key, path, idempotencyKey, body) {
  const response = await fetch(url + path, {
    method: "POST",
    headers: {
      Authorization: `Bearer ${key}`,
      "Idempotency-Key": idempotencyKey,
      "Content-Type": "application/json",
    },
    body: JSON.stringify(body),
  });
  const data = await response.json();
  if (response.status !== 201) throw new Error(`${path}: ${response.status} ${JSON.stringify(data)}`);
  return data;
}

function check(condition, message) {
  if (!condition) throw new Error(message);
}

async function main() {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM_BIN,
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  page.setDefaultTimeout(WAIT_MS);
  // Deleting asks for confirmation: the operator confirms.
  page.on("dialog", (dialog) => dialog.accept());
  try {
    await (process.env.PHASE === "in-flight" ? inFlight(page) : run(page));
  } catch (error) {
    await page.screenshot({ path: `${shots}/failure.png`, fullPage: true }).catch(() => {});
    throw error;
  } finally {
    await browser.close();
  }
}

const node = (page, name) => page.locator(`li[data-node="${name}"]`);
const balance = (page, name) => page.locator(`[data-balance-of="${name}"]`);

async function signIn(page, key) {
  await page.getByLabel("API key").fill(key);
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("heading", { name: "Account hierarchy" }).waitFor();
}

/// Refreshes the tree until a node's roll-up reads `expected` (the projection lags a little).
async function waitForBalance(page, name, expected) {
  const deadline = Date.now() + WAIT_MS;
  for (;;) {
    const text = await balance(page, name).textContent();
    if (text === expected) return;
    if (Date.now() > deadline) throw new Error(`${name} shows ${text}, expected ${expected}`);
    await page.getByRole("button", { name: "Refresh" }).click();
    await page.waitForTimeout(200);
  }
}

async function run(page) {
  await page.goto(`${url}/console/`);
  await page.screenshot({ path: `${shots}/sign-in.png` });
  // A wrong key is refused with a message.
  await page.getByLabel("API key").fill("wk_nope_nope");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "Authentication required" }).waitFor();
  check(!page.url().includes("wk_"), "the key must never be in the URL");

  // Build three levels by clicking, and attach the two wallets.
  await signIn(page, process.env.ADMIN_KEY);
  await page.getByLabel("New root node").fill("Company");
  await page.getByRole("button", { name: "Create root" }).click();
  await node(page, "Company").waitFor();
  await page.getByLabel("Child name for Company").fill("Europe");
  await page.getByLabel("Child name for Company").press("Enter");
  await node(page, "Europe").waitFor();
  await page.getByLabel("Child name for Europe").fill("Payments team");
  await page.getByLabel("Child name for Europe").press("Enter");
  await node(page, "Payments team").waitFor();
  await page.getByLabel("Wallet to attach to Payments team").fill(alice);
  await page.getByLabel("Wallet to attach to Payments team").press("Enter");
  await page.getByRole("link", { name: alice }).waitFor();
  await page.getByLabel("Wallet to attach to Europe").fill(bob);
  await page.getByLabel("Wallet to attach to Europe").press("Enter");
  await page.getByRole("link", { name: bob }).waitFor();
  await waitForBalance(page, "Company", "USD 0.00");

  // Money moves through the API; the roll-ups follow.
  const write = process.env.WRITE_KEY;
  await api(write, "/v1/deposits", "e2e-deposit-a", { wallet_id: alice, amount: "100.00", currency: "USD" });
  await api(write, "/v1/deposits", "e2e-deposit-b", { wallet_id: bob, amount: "50.00", currency: "USD" });
  const payment = await api(write, "/v1/payments", "e2e-pay", {
    from_wallet_id: alice, to_wallet_id: bob, amount: "30.00", currency: "USD",
  });
  await waitForBalance(page, "Payments team", "USD 70.00");
  await waitForBalance(page, "Europe", "USD 150.00");
  await waitForBalance(page, "Company", "USD 150.00");

  // A cycle is refused with a clear message, and the tree stays as it was.
  await page.getByLabel("Move Company under").selectOption({ label: "Payments team" });
  await node(page, "Company").locator("button", { hasText: "Move" }).first().click();
  await page.getByRole("alert").filter({ hasText: "cannot move under itself" }).waitFor();
  check(await page.locator('#tree > li[data-node="Company"]').count() === 1, "Company is still a root");
  // Deleting a node that has children is refused too.
  await page.getByRole("button", { name: "Delete Europe" }).click();
  await page.getByRole("alert").filter({ hasText: "Only a node without children" }).waitFor();
  // Detaching a wallet takes it out of the roll-ups; attaching puts it back.
  await page.getByRole("button", { name: `Detach ${bob} from Europe` }).click();
  await waitForBalance(page, "Europe", "USD 70.00");
  await page.getByLabel("Wallet to attach to Europe").fill(bob);
  await page.getByLabel("Wallet to attach to Europe").press("Enter");
  await waitForBalance(page, "Company", "USD 150.00");
  // Rename works.
  await page.getByLabel("New name for Company").fill("Company SE");
  await page.getByLabel("New name for Company").press("Enter");
  await node(page, "Company SE").waitFor();
  await page.screenshot({ path: `${shots}/hierarchy.png`, fullPage: true });

  // The account page of a wallet, from its link in the tree.
  await page.getByRole("link", { name: alice }).click();
  await page.getByRole("heading", { name: new RegExp(alice) }).waitFor();
  await page.getByRole("cell", { name: "payment_sent" }).waitFor();
  const available = page.locator("tr", { has: page.getByRole("cell", { name: "available", exact: true }) });
  check((await available.textContent()).includes("70.00"), "available is 70.00");
  // Its versions, newest first: the payment's debit made the newest.
  const newest = page.locator("#versions tbody tr").first();
  check((await newest.textContent()).includes("70.00"), "the newest version holds 70.00");
  check(await page.locator("#versions tbody tr").count() >= 3, "created, deposit, payment");
  await page.screenshot({ path: `${shots}/account.png`, fullPage: true });
  // Search by owner.
  await page.getByRole("link", { name: "Accounts" }).click();
  await page.getByLabel("Wallet id or owner id").fill("bob");
  await page.getByRole("button", { name: "Search" }).click();
  await page.getByRole("list", { name: "Wallets found" }).getByRole("link", { name: bob }).waitFor();

  // A transaction by id.
  await page.getByRole("link", { name: "Transactions" }).click();
  await page.getByLabel("Transaction id").fill(payment.transaction_id);
  await page.getByLabel("Transaction id").press("Enter");
  await page.getByRole("heading", { name: `${payment.transaction_id}: payment committed (done)` }).waitFor();
  await page.screenshot({ path: `${shots}/transaction.png`, fullPage: true });

  // The cluster: every group with its leader, refreshing live.
  await page.getByRole("link", { name: "Cluster" }).click();
  for (const group of ["topology 0", "storage 1", "storage 2", "coordinator 1"]) {
    const row = page.locator("tr", { has: page.getByRole("cell", { name: group, exact: true }) });
    await row.waitFor();
    check(/leader/.test(await row.textContent()), `${group} has a leader`);
  }
  const updated = await page.locator("#cluster-updated").textContent();
  await page.waitForFunction((before) => document.getElementById("cluster-updated").textContent !== before, updated);
  await page.screenshot({ path: `${shots}/cluster.png`, fullPage: true });

  // A read-only operator sees the tree and its roll-ups, and no control that edits.

  await page.getByRole("button", { name: "Sign out" }).click();
  check(await node(page, "Company SE").count() === 0, "signing out clears the page");
  await signIn(page, process.env.READ_KEY);
  await page.getByText("acme · read-only").waitFor();
  await waitForBalance(page, "Company SE", "USD 150.00");
  for (const name of ["Add child", "Rename", "Move", "Attach", "Create root"]) {
    const count = await page.getByRole("button", { name, exact: true }).count();
    check(count === 0, `a read-only operator sees ${count} "${name}" buttons`);
  }
  check(await page.getByRole("button", { name: /^Delete|^Detach/ }).count() === 0, "no delete or detach");
  check(!(await page.getByRole("link", { name: "Cluster" }).isVisible()), "no cluster page");
  await page.screenshot({ path: `${shots}/read-only.png`, fullPage: true });
  console.log("console end-to-end: passed");
}

/// With a payment stuck (its credit shard down), an admin sees it in flight and aborts it.
async function inFlight(page) {
  const stuck = process.env.STUCK_TRANSACTION;
  await page.goto(`${url}/console/`);
  await signIn(page, process.env.ADMIN_KEY);
  await page.getByRole("link", { name: "Transactions" }).click();
  const row = page.locator("tr", { has: page.getByRole("link", { name: stuck }) });
  await row.waitFor();
  check((await row.textContent()).includes("pending"), "the stuck payment is pending");
  await page.screenshot({ path: `${shots}/in-flight.png`, fullPage: true });
  await page.getByRole("button", { name: `Force abort ${stuck}` }).click();
  // Aborted, and still in flight until the shard returns to void its part.
  await row.filter({ hasText: "aborted" }).waitFor();
  check(await page.getByRole("button", { name: `Force abort ${stuck}` }).count() === 0,
    "a decided transaction offers no abort");
  console.log("console in-flight: passed");
}

main().catch((error) => {
  console.error(`console end-to-end: ${error.stack || error}`);
  process.exit(1);
});
