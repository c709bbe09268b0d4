-- A compare-and-set on a job's state that moves the batch counters in the same step.
-- ARGV: prefix, job_id, batch_id, to_state, ttl_s, lease_s, owner, lease_expired, charge,
-- n_from, from..., k, v, ...
-- - `owner` other than '': refused unless the job's `worker` is that owner (a worker whose lease
--   lapsed cannot finish or hand back a job another worker has since taken).
-- - `lease_expired` '1': refused unless the job's lease has expired by Redis's clock (the
--   reconciler: a renewal that came in after it looked wins).
-- - `charge` '0' with `to` queued: the attempt charged on entering `running` is not charged (the
--   farm failed, not the job).
-- - A running job whose cancel was requested never goes back to `queued`: it ends `cancelled`.
-- Returns {code, previous_state, batch_done, new_state}: code 1 done, 0 refused, -1 no such job.
-- Uses push_pending (push_pending.lua). A job's first final state takes one from its tenant's
-- count of jobs not yet final (`Keys.tenant_open`); terminal states are final, so only once.
local job_id, batch_id, to = ARGV[2], ARGV[3], ARGV[4]
local ttl, lease_s, owner = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7]
local lease_expired, charge = ARGV[8], ARGV[9]
local at = now()
local jk, bk = K.job(job_id), K.batch(batch_id)
local state = redis.call('HGET', jk, 'state')
if not state then return {-1, '', 0, ''} end
local nfrom = tonumber(ARGV[10])
local allowed = false
for i = 1, nfrom do
  if ARGV[10 + i] == state then allowed = true end
end
if not allowed then return {0, state, 0, state} end
if owner ~= '' and redis.call('HGET', jk, 'worker') ~= owner then return {0, state, 0, state} end
if lease_expired == '1' then
  local until_s = tonumber(redis.call('ZSCORE', K.leases(), job_id))
  if until_s and until_s > at then return {0, state, 0, state} end
end
for i = 11 + nfrom, #ARGV, 2 do
  redis.call('HSET', jk, ARGV[i], ARGV[i + 1])
end
if to == 'queued' and state == 'running' and redis.call('HGET', jk, 'cancel_requested') == '1' then
  to = 'cancelled'
  redis.call('HSET', jk, 'error', 'cancelled while rendering', 'reason', 'cancelled',
    'finished_at', string.format('%.6f', at))
end
redis.call('HSET', jk, 'state', to, 'updated_at', string.format('%.6f', at))
if to == 'succeeded' then
  redis.call('HINCRBY', jk, 'succeeded_count', 1)  -- audit: the fault suite asserts it is 1
end
if state ~= to then
  redis.call('HINCRBY', bk, state, -1)
  redis.call('HINCRBY', bk, to, 1)
end
if to == 'running' then
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('ZADD', K.leases(), at + lease_s, job_id)
  redis.call('ZREM', K.inflight(), job_id)
else
  redis.call('ZREM', K.leases(), job_id)
end
if to == 'queued' then
  if charge == '0' and state == 'running' then
    local attempts = tonumber(redis.call('HGET', jk, 'attempts')) or 0
    redis.call('HSET', jk, 'attempts', math.max(0, attempts - 1))
  end
  -- back to the dispatcher, first in its batch's lane
  redis.call('ZREM', K.inflight(), job_id)
  redis.call('HDEL', jk, 'worker', 'step', 'cancel_requested')
  push_pending(job_id, batch_id, string.format('%.6f', at))
  wake()
end
local done = 0
if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
  redis.call('ZREM', K.inflight(), job_id)
  if state == 'queued' or state == 'running' then
    -- one job fewer not yet final for its tenant's max_queued_jobs (batches counted at submit)
    local b = redis.call('HMGET', bk, 'tenant', 'open_counted')
    if b[2] == '1' then redis.call('DECR', K.tenant_open(b[1] or '$DEFAULT_TENANT')) end
  end
  local c = redis.call('HMGET', bk, 'total', 'succeeded', 'failed', 'cancelled')
  if tonumber(c[1]) == tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) then
    redis.call('HSET', bk, 'finished_at', string.format('%.6f', at))
    redis.call('RPUSH', K.finished(), batch_id)  -- the API writes the manifest, calls back
    done = 1
  end
end
redis.call('EXPIRE', jk, ttl)
redis.call('EXPIRE', bk, ttl)
redis.call('EXPIRE', K.batch_jobs(batch_id), ttl)
return {1, state, done, to}
