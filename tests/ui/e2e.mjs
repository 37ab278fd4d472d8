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

try {
  await page.goto(base + "/");
  expect((await page.title()) === "sentiflow", "the page title");

  step("without a key, errors are shown as messages");
  await page.click("#tab-models");
  await page.waitForSelector("#messages .message");
  expect((await page.textContent("#messages")).includes("API key"), "a message asking for a key");

  step("the key, asked once, kept for the session");
  await page.fill("#key", key);
  await page.press("#key", "Enter");
  expect(await page.evaluate(() => sessionStorage.getItem("sentiflow.key")) === key, "the key in sessionStorage");

  step("try: both models side by side, n-grams highlighted");
  await page.click("#tab-try");
  await page.fill("#review", "A wonderful, moving film: the acting is superb and the story is beautiful. " +
    "Only the ending felt a bit boring and predictable.");
  await page.click("#score");
  for (const model of ["tfidf", "bert"]) {
    await page.waitForSelector(`#results .card[data-model="${model}"] .probability`, { timeout: 30000 });
    const label = await page.textContent(`#results .card[data-model="${model}"] .label`);
    expect(["positive", "negative"].includes(label), `a label from ${model}, got ${label}`);
  }
  const marks = await page.$$eval('#results .card[data-model="tfidf"] .highlighted mark', (m) => m.length);
  expect(marks > 0, "highlighted n-grams in the review");
  await page.screenshot({ path: `${shots}/ui-try.png`, fullPage: true });

  step("train: start the quickstart pipeline and watch it finish");
  await page.click("#tab-train");
  await page.waitForSelector('#pipeline option[value="quickstart"]', { state: "attached" });
  await page.selectOption("#pipeline", "quickstart");
  await page.click("#start");
  await page.waitForFunction(() => {
    const s = document.querySelector("#run-state");
    return s && !["running", "queued"].includes(s.textContent);
  }, null, { timeout: 120000 });
  const state = await page.textContent("#run-state");
  expect(state === "succeeded", `a succeeded run, got ${state}`);
  const stages = await page.$$eval("#dag g.stage", (g) => g.map((x) => x.dataset.state));
  expect(stages.length === 7 && stages.every((s) => s === "ran" || s === "cached"), `7 finished stages, got ${stages}`);
  expect((await page.textContent("#log")).length > 0, "log lines");
  await page.screenshot({ path: `${shots}/ui-train.png`, fullPage: true });

  step("models: versions and best parameters");
  await page.click("#tab-models");
  await page.waitForSelector("#models tbody tr");
  await page.waitForSelector("#best .card");
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
  console.log("ui ok");
} finally {
  await browser.close();
}
