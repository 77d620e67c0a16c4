# Call a hutch task from Ruby and read its result, following docs/protocol.md (v1) only.
#
#   HUTCH_BROKER_URL=amqp://guest:guest@localhost:5672/ HUTCH_QUEUE=default ruby call.rb
#
# First it calls add(2, b=3.5) with a msgpack body and waits for the result, matched on
# correlation_id, on an exclusive server-named reply queue. Then it calls a task the worker does
# not have, nope(), reads its error result, and finds the request in Q.dlq with the header
# x-hutch-reason: unknown_task. It exits 0 if all of it went as the protocol says, 1 otherwise.

require "bunny"
require "json"
require "msgpack"
require "securerandom"
require "uri"

def env(name, default)
  value = ENV.fetch(name, "")
  value.empty? ? default : value
end

URL = env("HUTCH_BROKER_URL", "amqp://guest:guest@localhost:5672/")
QUEUE = env("HUTCH_QUEUE", "default")
TIMEOUT = Float(env("HUTCH_TIMEOUT", "30"))
CONTENT_TYPE = "application/msgpack"

# Section 9.1: the work queue and its dead-letter queue, declared exactly as hutch declares them.
def declare_queue(ch, queue)
  ch.queue("#{queue}.dlq", durable: true, arguments: { "x-queue-type" => "quorum", "x-delivery-limit" => 1_000_000 })
  work = ch.queue(queue, durable: true, arguments: {
    "x-queue-type" => "quorum",
    "x-delivery-limit" => 20,
    "x-dead-letter-exchange" => "",
    "x-dead-letter-routing-key" => "#{queue}.dlq",
    "x-dead-letter-strategy" => "at-least-once",
    "x-overflow" => "reject-publish",
  })
  work.bind(ch.topic("hutch.deliver", durable: true), routing_key: ("*." * 28) + queue)
end

class Caller
  def initialize(ch, queue)
    @ch = ch
    @queue = queue
    @lock = Mutex.new
    @arrived = ConditionVariable.new
    @results = {} # correlation_id => result body, for the calls being waited for
    @returned = []
    @ch.default_exchange.on_return { |_info, props, _body| @lock.synchronize { @returned << props.message_id } }
    # Section 6: a server-named, exclusive, auto-delete reply queue, consumed in no-ack mode.
    @replies = @ch.queue("", exclusive: true, auto_delete: true)
    @replies.subscribe(manual_ack: false) { |_info, props, body| on_result(props, body) }
  end

  def reply_queue = @replies.name

  def on_result(props, body)
    @lock.synchronize do
      # A late or duplicate result (tasks run at least once, section 5.2) is ignored.
      next unless @results.key?(props.correlation_id) && @results[props.correlation_id].nil?

      @results[props.correlation_id] = [props.content_type, body]
      @arrived.broadcast
    end
  end

  # Sections 2 and 3: publish persistent and mandatory, wait for the confirm, then the result.
  def call(task, args, kwargs)
    id = SecureRandom.hex(16)
    body = MessagePack.pack({ "args" => args, "kwargs" => kwargs })
    @lock.synchronize { @results[id] = nil }
    @ch.default_exchange.publish(
      body,
      routing_key: @queue,
      mandatory: true,
      persistent: true,
      content_type: CONTENT_TYPE,
      headers: { "task" => task },
      message_id: id,
      correlation_id: id,
      reply_to: reply_queue,
      timestamp: Time.now.to_i,
    )
    raise "publish of #{id} was not confirmed" unless @ch.wait_for_confirms
    raise "queue #{@queue} does not exist: #{id} came back" if @lock.synchronize { @returned.include?(id) }

    puts "published #{task} as #{id}, body #{body.unpack1('H*')} (confirmed)"
    deadline = Time.now + TIMEOUT
    content_type, raw = @lock.synchronize do
      while @results[id].nil?
        left = deadline - Time.now
        raise "no result for #{id} within #{TIMEOUT} s: is a worker running?" if left <= 0

        @arrived.wait(@lock, left)
      end
      @results.delete(id)
    end
    raise "result with content type #{content_type.inspect}" unless content_type == CONTENT_TYPE

    result = MessagePack.unpack(raw)
    puts "result of #{id}: #{JSON.generate(result)}"
    [id, body, result]
  end
end

# Section 8: look at the dead letters without taking them: get with manual acks, then hand back.
def find_dead_letter(ch, dlq, id)
  held = []
  loop do
    info, props, body = ch.basic_get(dlq, manual_ack: true)
    return nil if info.nil?

    held << info.delivery_tag
    return [props, body] if props[:message_id] == id # basic_get gives the properties as a Hash
  end
ensure
  held&.each { |tag| ch.nack(tag, false, true) }
end

def safe_url(url)
  uri = URI.parse(url)
  uri.password = "***" if uri.password
  uri.to_s
rescue URI::Error
  "(unparsable URL)"
end

def main
  puts "broker #{safe_url(URL)}, queue #{QUEUE}, content type #{CONTENT_TYPE}"
  conn = Bunny.new(URL, log_level: :error)
  conn.start
  ok = true
  check = lambda do |cond, what|
    puts "#{cond ? 'ok' : 'FAILED'}: #{what}"
    ok &&= cond
  end
  begin
    ch = conn.create_channel
    declare_queue(ch, QUEUE)
    ch.confirm_select
    caller = Caller.new(ch, QUEUE)
    puts "reply queue #{caller.reply_queue}"

    # 1. A good call.
    _, _, result = caller.call("add", [2], { "b" => 3.5 })
    check.call(result["ok"] == true && result["result"] == 5.5, "add(2, b=3.5) = 5.5")

    # 2. A bad call: the worker has no task named nope.
    id, body, result = caller.call("nope", [], {})
    check.call(result["ok"] == false && result.dig("error", "type") == "unknown_task",
               "error result of type unknown_task")

    # Section 5.2: the dead letter is confirmed in Q.dlq before the error result is sent.
    props, dead_body = find_dead_letter(ch, "#{QUEUE}.dlq", id)
    if props.nil?
      check.call(false, "dead letter #{id} in #{QUEUE}.dlq")
    else
      headers = props[:headers] || {}
      reason = headers["x-hutch-reason"].to_s
      puts "dead letter #{id} in #{QUEUE}.dlq: x-hutch-reason=#{reason} " \
           "x-hutch-error-message=#{headers['x-hutch-error-message'].to_s.inspect}"
      check.call(reason == "unknown_task" && dead_body.b == body.b,
                 "dead letter with x-hutch-reason unknown_task and the original body")
    end
  ensure
    conn.close
  end
  puts ok ? "all checks passed" : "some checks FAILED"
  ok
end

begin
  exit(main ? 0 : 1)
rescue StandardError, Bunny::Exception => e
  warn "error: #{e.class}: #{e.message}"
  exit 1
end
