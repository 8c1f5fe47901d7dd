import { afterEach, expect, it, vi } from 'vitest';
import { requireRoot } from './privileges.ts';

afterEach(() => vi.restoreAllMocks());

it('stops a suite run by another user, naming the suite by its path in the checkout and what it needs root for', () => {
  vi.spyOn(process, 'getuid').mockReturnValue(65534);
  expect(() => requireRoot(import.meta.url, 'network namespaces, BPF')).toThrow(
    /^testing\/privileges\.test\.ts needs root \(network namespaces, BPF\): run it as root$/,
  );
});

it('lets root through', () => {
  vi.spyOn(process, 'getuid').mockReturnValue(0);
  expect(() => requireRoot(import.meta.url, 'network namespaces, BPF')).not.toThrow();
});
