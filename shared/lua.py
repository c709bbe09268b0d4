"""The ledger's Lua scripts. Each runs atomically in Redis, so counters can never drift.

Key names are built inside the scripts from the prefix (ARGV[1]) with the same scheme as
`shared.keys.Keys`; the farm targets a single Redis (not Redis Cluster), where that is allowed.
"""

from __future__ import annotations

# A compare-and-set on a job's state that moves the batch counters in the same step.
# ARGV: prefix, job_id, batch_id, to_state, now, ttl_s, lease_until, n_from, from..., k, v, ...
# Returns {code, previous_state, batch_done}: code 1 done, 0 refused, -1 no such job.
TRANSITION = r"""
local p, job_id, batch_id, to = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local now, ttl, lease_until = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local jk = p .. ':job:' .. job_id
local bk = p .. ':batch:' .. batch_id
local state = redis.call('HGET', jk, 'state')
if not state then return {-1, '', 0} end
local nfrom = tonumber(ARGV[8])
local allowed = false
for i = 1, nfrom do
  if ARGV[8 + i] == state then allowed = true end
end
if not allowed then return {0, state, 0} end
for i = 9 + nfrom, #ARGV, 2 do
  redis.call('HSET', jk, ARGV[i], ARGV[i + 1])
end
redis.call('HSET', jk, 'state', to, 'updated_at', now)
if state ~= to then
  redis.call('HINCRBY', bk, state, -1)
  redis.call('HINCRBY', bk, to, 1)
end
if to == 'running' then
  redis.call('HINCRBY', jk, 'attempts', 1)
  redis.call('ZADD', p .. ':leases', lease_until, job_id)
  redis.call('ZREM', p .. ':inflight', job_id)
else
  redis.call('ZREM', p .. ':leases', job_id)
end
if to == 'queued' then
  -- back to the dispatcher: same pending list as at submit
  local compat = redis.call('HGET', jk, 'compat')
  local model = redis.call('HGET', jk, 'model')
  redis.call('ZREM', p .. ':inflight', job_id)
  redis.call('HDEL', jk, 'worker', 'step', 'cancel_requested')
  redis.call('RPUSH', p .. ':pending:' .. compat, job_id)
  local seq = redis.call('INCR', p .. ':seq')
  redis.call('ZADD', p .. ':pending-index:' .. model, 'NX', seq, compat)
  redis.call('SADD', p .. ':pending-models', model)
  redis.call('LPUSH', p .. ':wake', '1')
  redis.call('LTRIM', p .. ':wake', 0, 0)
end
local done = 0
if to == 'succeeded' or to == 'failed' or to == 'cancelled' then
  redis.call('ZREM', p .. ':inflight', job_id)
  local c = redis.call('HMGET', bk, 'total', 'succeeded', 'failed', 'cancelled')
  if tonumber(c[1]) == tonumber(c[2]) + tonumber(c[3]) + tonumber(c[4]) then
    redis.call('HSET', bk, 'finished_at', now)
    done = 1
  end
end
redis.call('EXPIRE', jk, ttl)
redis.call('EXPIRE', bk, ttl)
redis.call('EXPIRE', bk .. ':jobs', ttl)
return {1, state, done}
"""

# Take up to `max` queued jobs that can share one pass: the oldest pending key of a model first.
# ARGV: prefix, model, max, now. Returns {compat, job_id...} (compat '' when nothing is pending).
TAKE_CHUNK = r"""
local p, model, max, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local index = p .. ':pending-index:' .. model
local taken = {}
local chosen = ''
local budget = max * 64  -- bounds the work spent skipping cancelled ids in one call
while #taken < max and budget > 0 do
  local first = redis.call('ZRANGE', index, 0, 0)
  if #first == 0 then break end
  if chosen ~= '' and first[1] ~= chosen then break end
  chosen = first[1]
  local id = redis.call('LPOP', p .. ':pending:' .. chosen)
  if not id then
    redis.call('ZREM', index, chosen)
    if #taken > 0 then break end
    chosen = ''
  else
    budget = budget - 1
    if redis.call('HGET', p .. ':job:' .. id, 'state') == 'queued' then
      taken[#taken + 1] = id
      redis.call('ZADD', p .. ':inflight', now, id)
      redis.call('HINCRBY', p .. ':job:' .. id, 'dispatches', 1)
    end
  end
end
if chosen ~= '' and redis.call('LLEN', p .. ':pending:' .. chosen) == 0 then
  redis.call('ZREM', index, chosen)
end
if redis.call('ZCARD', index) == 0 then
  redis.call('SREM', p .. ':pending-models', model)
end
local out = {chosen}
for i = 1, #taken do out[#out + 1] = taken[i] end
return out
"""

# A worker's heartbeat for the jobs it renders: renew the leases it still holds, write progress,
# report cancels. ARGV: prefix, worker, lease_until, step, steps, job_id... (step '' = no progress)
# Returns the ids whose cancel was requested.
RENEW_LEASES = r"""
local p, worker, lease_until, step, steps = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local cancelled = {}
for i = 6, #ARGV do
  local jk = p .. ':job:' .. ARGV[i]
  local f = redis.call('HMGET', jk, 'state', 'worker', 'cancel_requested')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', p .. ':leases', 'XX', lease_until, ARGV[i])
    if step ~= '' then redis.call('HSET', jk, 'step', step, 'steps', steps) end
    if f[3] == '1' then cancelled[#cancelled + 1] = ARGV[i] end
  end
end
return cancelled
"""
