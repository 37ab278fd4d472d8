// Drives the web interface in headless Chromium against a running server.
// Usage: node e2e.mjs BASE_URL ADMIN_KEY SCREENSHOT_DIR   (Chromium: $SENTIFLOW_CHROMIUM or /usr/bin/chromium)
import { chromium } from "playwright-core";

const [base, key, shots] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.SENTIFLOW_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
const step = (name) => console.log("step:", name);
const expect = (ok, what) => { if (!ok) throw new Error("expected " + what); };
// The texts of the error messages a person can see.
const shownErrors = () => page.$$eval(".error", (es) => es.filter((e) => e.offsetParent !== null).map((e) => e.textContent));

try {
  await page.goto(base + "/");
  expect((await page.title()) === "sentiflow", "the page title");

  step("without a key, an error shows in the panel of the action that failed, and only there");
  await page.click("#tab-models");
  await page.waitForSelector("#error-models:not(:empty)");
  expect((await page.textContent("#error-models")).includes("API key"), "an error asking for a key, got " + await page.textContent("#error-models"));
  await page.click("#tab-try");
  expect((await shownErrors()).length === 0, "no error over the Try tab, got " + await shownErrors());

  step("an action's error goes away when that action next succeeds");
  await page.click("#score");
  await page.waitForSelector("#error-score:not(:empty)");
  expect((await page.textContent("#error-score")).includes("Type a review"), "an error asking for a review");
  await page.fill("#review", "A wonderful, moving film: the acting is superb and the story is beautiful. " +
    "Only the ending felt a bit boring and predictable.");
  await page.click("#score");
  await page.waitForSelector("#error-score:empty", { state: "attached" });
  await page.waitForSelector('#results .card[data-model="tfidf"] .error:not(:empty)');
  expect((await page.textContent('#results .card[data-model="tfidf"] .error')).includes("API key"), "the card's own error");

  step("the key, asked once, kept for the session; the old key's errors are gone");
  await page.fill("#key", key);
  await page.press("#key", "Enter");
  expect(await page.evaluate(() => sessionStorage.getItem("sentiflow.key")) === key, "the key in sessionStorage");
  expect((await shownErrors()).length === 0, "no error after a new key, got " + await shownErrors());

  step("try: both models side by side, n-grams highlighted");
  await page.click("#score");
  for (const model of ["tfidf", "bert"]) {
    await page.waitForSelector(`#results .card[data-model="${model}"] .probability`, { timeout: 30000 });
    const label = await page.textContent(`#results .card[data-model="${model}"] .label`);
    expect(["positive", "negative"].includes(label), `a label from ${model}, got ${label}`);
  }
  const marks = await page.$$eval('#results .card[data-model="tfidf"] .highlighted mark', (m) => m.length);
  expect(marks > 0, "highlighted n-grams in the review");
  expect((await shownErrors()).length === 0, "no error beside the answers, got " + await shownErrors());

  step("try: the request as curl and Python, without the key");
  expect(await page.isVisible("#snippets"), "the 'use via API' snippets");
  const curl = await page.textContent("#snippet-curl");
  const python = await page.textContent("#snippet-python");
  expect(curl.includes(base + "/prediction") && curl.includes("$SENTIFLOW_KEY"), "a curl command for the request, got " + curl);
  expect(python.includes("requests.post") && python.includes("wonderful, moving film"), "a Python snippet with the review, got " + python);
  expect(!curl.includes(key) && !python.includes(key), "the key kept out of the snippets");

  step("try: feedback on an answer");
  await page.click('#results .card[data-model="tfidf"] .feedback button[data-correct="1"]');
  await page.waitForSelector('#results .card[data-model="tfidf"] .feedback-result:not(:empty)');
  expect((await page.textContent('#results .card[data-model="tfidf"] .feedback-result')).includes("recorded as right"), "the feedback recorded");
  await page.screenshot({ path: `${shots}/ui-try.png`, fullPage: true });

  step("try: an example review fills the box");
  await page.click('button[data-example="1"]');
  expect((await page.inputValue("#review")).includes("waste of two hours"), "the example in the review box");

  step("train: a rejected start shows why beside it, until a start succeeds");
  await page.click("#tab-train");
  await page.waitForSelector('#pipeline option[value="quickstart"]', { state: "attached" });
  await page.selectOption("#pipeline", "quickstart");
  await page.fill('#params input[data-param="seed"]', "not a number");
  await page.click("#start");
  await page.waitForSelector("#error-training:not(:empty)");
  expect((await page.textContent("#error-training")).startsWith("POST /training:"), "the start's error");

  step("train: start the quickstart pipeline and watch it finish");
  await page.fill('#params input[data-param="seed"]', "42");
  await page.click("#start");
  await page.waitForSelector("#error-training:empty", { state: "attached" });
  await page.waitForFunction(() => {
    const s = document.querySelector("#run-state");
    return s && !["running", "queued"].includes(s.textContent);
  }, null, { timeout: 120000 });
  const state = await page.textContent("#run-state");
  expect(state === "succeeded", `a succeeded run, got ${state}`);
  const stages = await page.$$eval("#dag g.stage", (g) => g.map((x) => x.dataset.state));
  expect(stages.length === 7 && stages.every((s) => s === "ran" || s === "cached"), `7 finished stages, got ${stages}`);
  expect((await page.textContent("#log")).length > 0, "log lines");
  expect((await shownErrors()).length === 0, "no error after a successful run, got " + await shownErrors());

  step("runs: the history lists the run with its trigger and status");
  await page.waitForSelector("#runs tbody tr[data-run] .run-status");
  const first = await page.$eval("#runs tbody tr[data-run]", (tr) => ({
    status: tr.querySelector(".run-status").textContent, trigger: tr.querySelector(".trigger").textContent }));
  expect(first.status === "succeeded" && first.trigger === "api", "the newest run succeeded, started through the API, got " + JSON.stringify(first));

  step("runs: cancel a running training");
  await page.selectOption("#pipeline", "slow");
  await page.click("#start");
  await page.waitForSelector("#runs tbody tr[data-run] button[data-cancel]", { timeout: 20000 });
  await page.click("#runs tbody tr[data-run] button[data-cancel]");
  await page.waitForFunction(() => {
    const s = document.querySelector("#runs tbody tr[data-run] .run-status");
    return s && s.textContent === "cancelled";
  }, null, { timeout: 30000 });
  // The panel and the history agree from the moment the history shows it: no second read.
  expect(await page.textContent("#run-state") === "cancelled", "the run's own status cancelled");
  await page.selectOption("#runs-status", "cancelled");
  await page.waitForFunction(() => [...document.querySelectorAll("#runs tbody tr[data-run] .run-status")].every((s) => s.textContent === "cancelled")
    && document.querySelectorAll("#runs tbody tr[data-run]").length === 1);
  await page.selectOption("#runs-status", "");
  expect((await shownErrors()).length === 0, "no error after the cancel, got " + await shownErrors());
  await page.screenshot({ path: `${shots}/ui-train.png`, fullPage: true });

  step("models: versions and best parameters");
  await page.click("#tab-models");
  await page.waitForSelector("#models tbody tr");
  await page.waitForSelector("#best .card");
  expect((await shownErrors()).length === 0, "no error once the key is set, got " + await shownErrors());

  step("models: the trained version is a candidate, with its shadow figures and the gate's verdict");
  await page.waitForSelector("#candidates .candidate");
  const candidate = await page.getAttribute("#candidates .candidate", "data-version");
  await page.waitForSelector('#candidates .candidate li[data-condition="min_shadow"]');

  step("models: a canary for the candidate, then stopped");
  await page.fill(`.canary[data-version="${candidate}"] input`, "10");
  await page.click(`button[data-canary-start="${candidate}"]`);
  await page.waitForFunction((v) => document.querySelector(`#candidates .candidate[data-version="${v}"] .canary-percent`)?.textContent === "10", candidate);
  await page.click(`button[data-canary-stop="${candidate}"]`);
  await page.waitForFunction((v) => document.querySelector(`#candidates .candidate[data-version="${v}"] .canary-percent`)?.textContent === "0", candidate);

  step("models: two versions side by side");
  // The production version of the candidate's name.
  const production = await page.$$eval("#models tbody tr", (rows, v) => {
    const name = rows.find((r) => r.dataset.version === v).children[1].textContent;
    return rows.find((r) => r.children[1].textContent === name && r.querySelector(".status-production")).dataset.version;
  }, candidate);
  await page.check(`#models input.pick[value="${production}"]`);
  await page.check(`#models input.pick[value="${candidate}"]`);
  await page.click("#compare");
  await page.waitForSelector("#comparison table.compare");
  expect(await page.$$eval("#comparison table.confusion", (t) => t.length) === 2, "two confusion matrices");
  expect(await page.$$eval("#comparison tr.metric", (t) => t.length) === 6, "six validation metrics");
  expect((await shownErrors()).length === 0, "no error on the models tab, got " + await shownErrors());
  await page.screenshot({ path: `${shots}/ui-models.png`, fullPage: true });

  step("drift: statuses and charts");
  await page.click("#tab-drift");
  await page.waitForSelector('.drift-model[data-model="tfidf"] .overall');
  const overall = await page.textContent('.drift-model[data-model="tfidf"] .overall');
  expect(["ok", "warn", "alert"].includes(overall), `a drift status, got ${overall}`);
  expect(await page.$$eval('.drift-model[data-model="tfidf"] svg', (s) => s.length) === 2, "two drift charts");
  await page.screenshot({ path: `${shots}/ui-drift.png`, fullPage: true });

  step("keyboard: arrow keys move between tabs");
  await page.focus("#tab-drift");
  await page.keyboard.press("ArrowLeft");
  expect(await page.getAttribute("#tab-models", "aria-selected") === "true", "ArrowLeft selects the previous tab");

  step("narrow screens");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.click("#tab-try");
  await page.screenshot({ path: `${shots}/ui-phone.png`, fullPage: true });

  expect(errors.length === 0, "no script errors: " + errors.join("; "));

  step("API documentation: Swagger UI at /docs, every file from this server");
  const docs = await browser.newPage();
  const requested = [];
  const consoleErrors = [];
  docs.on("request", (r) => requested.push(r.url()));
  docs.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  docs.on("pageerror", (e) => consoleErrors.push(e.message));
  await docs.goto(base + "/docs");
  await docs.waitForSelector(".opblock-summary-path", { timeout: 20000 });
  const paths = await docs.$$eval(".opblock-summary-path", (es) => es.map((e) => e.textContent.trim()));
  expect(paths.includes("/prediction") && paths.includes("/best_model_parameter") && paths.includes("/training"),
         "the contract's operations listed, got " + paths.join(", "));
  await docs.screenshot({ path: `${shots}/ui-docs.png` });
  const away = requested.filter((u) => !u.startsWith(base + "/") && !u.startsWith("data:"));
  expect(away.length === 0, "no request leaves the server, got " + away.join(", "));
  expect(requested.some((u) => u === base + "/openapi.json"), "the document read from /openapi.json");
  expect(consoleErrors.length === 0, "no errors in the docs page (a Content-Security-Policy refusal is one): " + consoleErrors.join("; "));
  console.log("ui ok");
} finally {
  await browser.close();
}
