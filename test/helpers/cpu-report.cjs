// Preloaded into our CLI by the hostile tests (node --require): at exit, record the process's own
// CPU time (user + system, ms) in the file named by QK_CPU_REPORT. CPU time, unlike wall-clock
// time, is not inflated when the test machine is busy, so the per-case bound stays meaningful.
'use strict';
const fs = require('node:fs');
const target = process.env.QK_CPU_REPORT;
if (target) {
  process.on('exit', () => {
    const u = process.cpuUsage();
    try {
      fs.writeFileSync(target, String((u.user + u.system) / 1000));
    } catch {
      // nothing to report to
    }
  });
}
