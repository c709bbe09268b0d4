-- Retry: failed or cancelled jobs go back to `queued` with their original spec and seed. Terminal
-- states are otherwise final, so this is its own script rather than a TRANSITION: it resets the
-- attempts, clears the last outcome, moves the counters (the tenant's open jobs too) and reopens
-- the batch, all atomically.
-- ARGV: prefix, batch_id, ttl_s, job_id... Returns how many jobs were re-queued.
-- Uses push_pending (push_pending.lua).
local batch_id, ttl = ARGV[2], tonumber(ARGV[3])
local at = string.format('%.6f', now())
local bk = K.batch(batch_id)
local moved = 0
for i = 4, #ARGV do
  local id = ARGV[i]
  local jk = K.job(id)
  local state = redis.call('HGET', jk, 'state')
  if state == 'failed' or state == 'cancelled' then
    redis.call('HDEL', jk, 'error', 'last_error', 'result', 'timings', 'finished_at', 'started_at',
      'worker', 'step', 'cancel_requested', 'model_hash', 'model_family', 'refiner_hash',
      'dispatches', 'reason')
    redis.call('HSET', jk, 'state', 'queued', 'attempts', 0, 'updated_at', at, 'retried_at', at)
    redis.call('HINCRBY', jk, 'retries', 1)
    redis.call('HINCRBY', bk, state, -1)
    redis.call('HINCRBY', bk, 'queued', 1)
    push_pending(id, batch_id, at)  -- back to the dispatcher, as TRANSITION does
    redis.call('EXPIRE', jk, ttl)
    moved = moved + 1
  end
end
if moved > 0 then
  local b = redis.call('HMGET', bk, 'tenant', 'open_counted')
  if b[2] == '1' then redis.call('INCRBY', K.tenant_open(b[1] or '$DEFAULT_TENANT'), moved) end
  redis.call('HDEL', bk, 'finished_at', 'cancelled_at')
  redis.call('ZADD', K.active_batches(), redis.call('HGET', bk, 'created_at'), batch_id)
  redis.call('EXPIRE', bk, ttl)
  redis.call('EXPIRE', K.batch_jobs(batch_id), ttl)
  wake()
end
return moved
