-- Put one job back into the pending structure (`shared.ledger.pending`), first in its lane: it has
-- waited already. A batch that had left its tenant's turn order rejoins at the back of its
-- priority class, and a tenant that had left the model's tenant turns rejoins them.
-- Shared by every script that re-queues (TRANSITION, RETRY_JOBS). Uses join_tenant.
local function push_pending(job_id, batch_id, at)
  local f = redis.call('HMGET', K.job(job_id), 'compat', 'model')
  local compat, model = f[1], f[2]
  local b = redis.call('HMGET', K.batch(batch_id), 'priority', 'tenant')
  local tenant = b[2] or '$DEFAULT_TENANT'
  redis.call('LPUSH', K.pending_jobs(compat, batch_id), job_id)
  local seq = redis.call('INCR', K.sequence())
  redis.call('ZADD', K.batch_pending(model, batch_id), 'NX', seq, compat)
  redis.call('ZADD', K.pending(compat), 'NX', seq, batch_id)
  redis.call('ZADD', K.tenant_pending(tenant, compat), 'NX', seq, batch_id)
  local turns = K.batch_turns(model, tenant)
  if not redis.call('ZSCORE', turns, batch_id) then
    local prio = tonumber(b[1]) or $DEFAULT_PRIORITY
    prio = math.max(0, math.min($MAX_PRIORITY, math.floor(prio)))
    redis.call('ZADD', turns, ($MAX_PRIORITY - prio) * $PRIORITY_CLASS + seq, batch_id)
  end
  join_tenant(model, tenant)
  redis.call('HSETNX', K.pending_since(), compat, at)
  redis.call('SADD', K.pending_models(), model)
end
