// Call a hutch task from Go and read its result, following docs/protocol.md (v1) only.
//
//	HUTCH_BROKER_URL=amqp://guest:guest@localhost:5672/ HUTCH_QUEUE=default \
//	GO111MODULE=off GOPATH=/usr/share/gocode go run main.go
//
// First it calls add(2, b=3.5) with a JSON body and waits for the result, matched on
// correlation_id, on an exclusive server-named reply queue. Then it makes a bad call,
// add(1, c=2), reads its error result, and finds the request in Q.dlq with the header
// x-hutch-reason: bad_args. It exits 0 if all of it went as the protocol says, 1 otherwise.
package main

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

const contentType = "application/json"

// §4: the body is {"args": [...], "kwargs": {...}}.
type request struct {
	Args   []interface{}          `json:"args"`
	Kwargs map[string]interface{} `json:"kwargs"`
}

// §5.3: {"ok": true, "result": ...} or {"ok": false, "error": {"type": ..., "message": ...}}.
type result struct {
	Ok     bool            `json:"ok"`
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
}

func env(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func newID() string {
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func safeURL(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	return u.Redacted()
}

// §9.1: the work queue and its dead-letter queue, declared exactly as hutch declares them.
func declareQueue(ch *amqp.Channel, queue string) error {
	if _, err := ch.QueueDeclare(queue+".dlq", true, false, false, false,
		amqp.Table{"x-queue-type": "quorum", "x-delivery-limit": int32(1000000)}); err != nil {
		return err
	}
	if _, err := ch.QueueDeclare(queue, true, false, false, false, amqp.Table{
		"x-queue-type":              "quorum",
		"x-delivery-limit":          int32(20),
		"x-dead-letter-exchange":    "",
		"x-dead-letter-routing-key": queue + ".dlq",
		"x-dead-letter-strategy":    "at-least-once",
		"x-overflow":                "reject-publish",
	}); err != nil {
		return err
	}
	if err := ch.ExchangeDeclare("hutch.deliver", "topic", true, false, false, false, nil); err != nil {
		return err
	}
	return ch.QueueBind(queue, strings.Repeat("*.", 28)+queue, "hutch.deliver", false, nil)
}

type caller struct {
	ch       *amqp.Channel
	queue    string
	replyTo  string
	results  <-chan amqp.Delivery
	confirms chan amqp.Confirmation
	returns  chan amqp.Return
	timeout  time.Duration
}

// call publishes one task (§2, §3) and waits for its result (§6).
func (c *caller) call(task string, req request) (string, []byte, *result, error) {
	id := newID()
	body, err := json.Marshal(req)
	if err != nil {
		return id, nil, nil, err
	}
	err = c.ch.Publish("", c.queue, true, false, amqp.Publishing{
		ContentType:   contentType,
		Headers:       amqp.Table{"task": task},
		MessageId:     id,
		CorrelationId: id,
		ReplyTo:       c.replyTo,
		DeliveryMode:  amqp.Persistent,
		Timestamp:     time.Now(),
		Body:          body,
	})
	if err != nil {
		return id, body, nil, err
	}
	deadline := time.After(c.timeout)
	select {
	case confirm := <-c.confirms:
		if !confirm.Ack {
			return id, body, nil, fmt.Errorf("publish of %s was refused by the broker", id)
		}
	case <-deadline:
		return id, body, nil, fmt.Errorf("no confirm for %s", id)
	}
	select { // a basic.return comes before the confirm
	case ret := <-c.returns:
		return id, body, nil, fmt.Errorf("queue %s does not exist: %s came back (%s)",
			c.queue, ret.MessageId, ret.ReplyText)
	default:
	}
	fmt.Printf("published %s %s as %s (confirmed)\n", task, body, id)
	for {
		select {
		case msg, ok := <-c.results:
			if !ok {
				return id, body, nil, fmt.Errorf("reply consumer closed")
			}
			if msg.CorrelationId != id {
				continue // a late or duplicate result: tasks run at least once (§5.2)
			}
			if msg.ContentType != contentType {
				return id, body, nil, fmt.Errorf("result with content type %q", msg.ContentType)
			}
			var res result
			if err := json.Unmarshal(msg.Body, &res); err != nil {
				return id, body, nil, fmt.Errorf("unreadable result %q: %v", msg.Body, err)
			}
			fmt.Printf("result of %s: %s\n", id, msg.Body)
			return id, body, &res, nil
		case <-deadline:
			return id, body, nil, fmt.Errorf("no result for %s within %s: is a worker running?",
				id, c.timeout)
		}
	}
}

// findDeadLetter looks at Q.dlq without taking anything (§8): get with manual acks, then nack
// with requeue everything it held.
func findDeadLetter(ch *amqp.Channel, dlq, id string) (*amqp.Delivery, error) {
	var held []amqp.Delivery
	defer func() {
		for _, msg := range held {
			_ = msg.Nack(false, true)
		}
	}()
	for {
		msg, ok, err := ch.Get(dlq, false)
		if err != nil {
			return nil, err
		}
		if !ok {
			return nil, nil
		}
		held = append(held, msg)
		if msg.MessageId == id {
			found := msg
			return &found, nil
		}
	}
}

func run() (bool, error) {
	brokerURL := env("HUTCH_BROKER_URL", "amqp://guest:guest@localhost:5672/")
	queue := env("HUTCH_QUEUE", "default")
	seconds, err := strconv.ParseFloat(env("HUTCH_TIMEOUT", "30"), 64)
	if err != nil {
		return false, fmt.Errorf("HUTCH_TIMEOUT: %v", err)
	}
	fmt.Printf("broker %s, queue %s, content type %s\n", safeURL(brokerURL), queue, contentType)

	conn, err := amqp.Dial(brokerURL)
	if err != nil {
		return false, err
	}
	defer conn.Close()
	ch, err := conn.Channel()
	if err != nil {
		return false, err
	}
	if err := declareQueue(ch, queue); err != nil {
		return false, err
	}
	if err := ch.Confirm(false); err != nil {
		return false, err
	}
	c := &caller{
		ch:       ch,
		queue:    queue,
		confirms: ch.NotifyPublish(make(chan amqp.Confirmation, 1)),
		returns:  ch.NotifyReturn(make(chan amqp.Return, 1)),
		timeout:  time.Duration(seconds * float64(time.Second)),
	}
	// §6: a server-named, exclusive, auto-delete reply queue, consumed in no-ack mode.
	replies, err := ch.QueueDeclare("", false, true, true, false, nil)
	if err != nil {
		return false, err
	}
	c.replyTo = replies.Name
	if c.results, err = ch.Consume(replies.Name, "", true, true, false, false, nil); err != nil {
		return false, err
	}
	fmt.Printf("reply queue %s\n", c.replyTo)

	ok := true
	check := func(cond bool, what string) {
		if cond {
			fmt.Printf("ok: %s\n", what)
		} else {
			fmt.Printf("FAILED: %s\n", what)
			ok = false
		}
	}

	// 1. A good call.
	_, _, res, err := c.call("add", request{
		Args: []interface{}{2}, Kwargs: map[string]interface{}{"b": 3.5}})
	if err != nil {
		return false, err
	}
	check(res.Ok && bytes.Equal(res.Result, []byte("5.5")), "add(2, b=3.5) = 5.5")

	// 2. A bad call: add has no parameter c, and b is missing.
	id, body, res, err := c.call("add", request{
		Args: []interface{}{1}, Kwargs: map[string]interface{}{"c": 2}})
	if err != nil {
		return false, err
	}
	check(!res.Ok && res.Error != nil && res.Error.Type == "bad_args", "error result of type bad_args")

	// §5.2: the dead letter is confirmed in Q.dlq before the error result is sent.
	dead, err := findDeadLetter(ch, queue+".dlq", id)
	if err != nil {
		return false, err
	}
	if dead == nil {
		check(false, fmt.Sprintf("dead letter %s in %s.dlq", id, queue))
	} else {
		reason, _ := dead.Headers["x-hutch-reason"].(string)
		message, _ := dead.Headers["x-hutch-error-message"].(string)
		fmt.Printf("dead letter %s in %s.dlq: x-hutch-reason=%s x-hutch-error-message=%q\n",
			id, queue, reason, message)
		check(reason == "bad_args" && bytes.Equal(dead.Body, body),
			"dead letter with x-hutch-reason bad_args and the original body")
	}
	return ok, nil
}

func main() {
	ok, err := run()
	if err != nil {
		fmt.Fprintf(os.Stderr, "error: %v\n", err)
		os.Exit(1)
	}
	if !ok {
		fmt.Println("some checks FAILED")
		os.Exit(1)
	}
	fmt.Println("all checks passed")
}
