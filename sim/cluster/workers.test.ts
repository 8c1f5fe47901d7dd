/**
 * workers.ts: points run in worker threads give exactly what the same points
 * give on this thread, in the jobs' order; a job that fails fails the map
 * with its error, not a hang or a lost result.
 */
import { describe, expect, it } from 'vitest';
import { runPointJob, type Point, type PointJob } from './study-points.ts';
import { mapInWorkers } from './workers.ts';

const MODULE = new URL('./study-points.ts', import.meta.url);
const withoutTime = ({ wallSeconds: _, ...p }: Point) => p;

describe('sim/cluster workers', () => {
  it('runs study points in two threads with the results of a run on this thread, in order', async () => {
    const jobs: PointJob[] = [
      { sweep: 'steady', quick: true, scheme: 'wide', x: 10, seed: 1 },
      { sweep: 'steady', quick: true, scheme: '6-bit', x: 10, seed: 1 },
      { sweep: 'churn', quick: true, scheme: '6-bit', x: 2, seed: 3 },
    ];
    const seen: number[] = [];
    const got = await mapInWorkers<PointJob, Point>(MODULE, jobs, { threads: 2, onResult: (i) => seen.push(i) });
    expect(seen.sort()).toEqual([0, 1, 2]);
    expect(got.map(withoutTime)).toEqual(jobs.map((j) => withoutTime(runPointJob(j))));
    // Not three copies of one run: the schemes differ in what reaches the fast path.
    expect(got[0].packetsPct).not.toBe(got[1].packetsPct);
  }, 120_000);

  it('fails the whole map with the failing job\'s error, once the job another worker holds has ended', async () => {
    const jobs: PointJob[] = [
      { sweep: 'steady', quick: true, scheme: 'wide', x: 10, seed: 1 },
      { sweep: 'no-such-sweep', quick: true, scheme: 'wide', x: 1, seed: 1 },
    ];
    const seen: number[] = [];
    await expect(mapInWorkers(MODULE, jobs, { threads: 2, onResult: (i) => seen.push(i) })).rejects.toThrow(/job 2 of 2: no sweep "no-such-sweep"/);
    // The first job (a second or so of simulation) ended before the map failed: its worker
    // was not torn down mid-job, which, while it still loads koffi, aborts the whole process.
    expect(seen).toEqual([0]);
  }, 120_000);
});
